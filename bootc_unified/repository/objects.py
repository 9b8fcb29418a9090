"""Content-addressed objects: `objects/XX/<rest>` named by fs-verity digest.

Every object is written into an O_TMPFILE (invisible until linked), finalised (fs-verity enabled
unless the repository is insecure), then linked into place with linkat; no partial object is ever
visible. File data is shared rather than copied where the filesystem allows: reflink (FICLONE),
else a hardlink to the source inode, else a copy.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bootc_unified import faults, verity, zerocopy
from bootc_unified.digestpool import FileDigest
from bootc_unified.errors import UserError
from bootc_unified.verity import HashAlg

_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symlink",
}


class Method(enum.Enum):
    REFLINKED = "reflinked"
    HARDLINKED = "hardlinked"
    COPIED = "copied"
    PRESENT = "already-present"


@dataclass(frozen=True)
class ObjectResult:
    object_id: str
    method: Method
    size: int


def describe_kind(mode: int) -> str:
    return _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_source(path: Path) -> int:
    """Open a regular file for reading, refusing symlinks, devices, FIFOs and directories.

    Opened with O_NOFOLLOW|O_NONBLOCK so neither a symlink nor a FIFO is followed or waited on.
    """
    return open_source_stat(path)[0]


def open_source_stat(path: Path | bytes) -> tuple[int, os.stat_result]:
    """open_source(), and the fstat of the file it opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{_shown(path)}: is a symlink; objects are made from regular files") from e
        if e.errno == errno.ENOENT:
            raise UserError(f"{_shown(path)}: no such file") from e
        if e.errno in (errno.ENXIO, errno.ENODEV):
            raise UserError(f"{_shown(path)}: is not a regular file") from e
        raise UserError(f"{_shown(path)}: cannot open: {e.strerror}") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = describe_kind(st.st_mode)
        raise UserError(f"{_shown(path)}: is {kind}; objects are made from regular files")
    return fd, st


def _shown(path: Path | bytes) -> str:
    return os.fsdecode(path) if isinstance(path, bytes) else str(path)


_root_fd: int | None = None


def link_fd(fd: int, dest: str | Path) -> None:
    """linkat(2) the inode behind an open fd (an O_TMPFILE too) to `dest`.

    os.link() only calls linkat with AT_SYMLINK_FOLLOW, which /proc/self/fd/N needs, when it is given
    a dir_fd; the paths are absolute, so the dir_fd itself is never used.
    """
    global _root_fd
    if _root_fd is None:
        _root_fd = os.open("/", os.O_PATH | os.O_CLOEXEC)
    os.link(f"/proc/self/fd/{fd}", dest, src_dir_fd=_root_fd, follow_symlinks=True)


def link_fd_within(fd: int, dest: str | Path, mount_dir: str | Path) -> None:
    """link_fd, where a source opened through another mount of `dest`'s filesystem (a bind mount,
    such as containers-storage's `overlay/` onto itself) is linked as the same inode reached
    through `mount_dir`'s own mount. Another filesystem stays EXDEV."""
    try:
        link_fd(fd, dest)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    mount_fd = os.open(mount_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        alias = zerocopy.reopen_through(fd, mount_fd)
    except OSError:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV)) from None
    finally:
        os.close(mount_fd)
    try:
        link_fd(alias, dest)
    finally:
        os.close(alias)


class ObjectStore:
    """The `objects/` directory of a repository."""

    def __init__(self, root: Path, alg: HashAlg, insecure: bool) -> None:
        self.root = root
        self.dir = root / "objects"
        self.alg = alg
        self.insecure = insecure
        self._dev = os.stat(self.dir).st_dev
        self._dir_str = str(self.dir)
        self._prefixes: set[str] = set()  # objects/XX directories known to exist
        self._reflink_probe = zerocopy.ReflinkProbe()
        self._known: set[str] | None = None  # every object's ID, within listed()

    def path_of(self, object_id: str) -> Path:
        return self.dir / object_id[:2] / object_id[2:]

    def __contains__(self, object_id: str) -> bool:
        return os.path.exists(f"{self._dir_str}/{object_id[:2]}/{object_id[2:]}")

    # --- writing ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def listed(self, adding: int) -> Iterator[None]:
        """Within, present() takes which objects exist from one listing of objects/ and stats only
        those that do, when about `adding` objects are to be added and that pays. For a writer
        holding the repository's writer lock, whose objects are all added through this store (each
        joins the listing).

        Measured here on btrfs and XFS: looking up a missing name costs 5 us (index cached) to 49 us
        (cold), and 12-19 us amid an import's inserts; listing costs 1.1-1.5 us per object there is
        (cold 4-11 us). So the listing is made when the layer adds at least a quarter as many objects
        as the repository holds, counted from its directories' sizes (about 136 bytes an entry on
        ext4, 149 on XFS, 252 on btrfs: never undercounted)."""
        known: set[str] = set()
        with os.scandir(self.dir) as entries:
            prefixes = [e for e in entries if len(e.name) == 2 and e.is_dir(follow_symlinks=False)]
        if 4 * adding >= sum(e.stat(follow_symlinks=False).st_size for e in prefixes) // 136:
            for prefix in prefixes:
                known.update(prefix.name + name for name in os.listdir(prefix.path) if name[0] != ".")
                self._prefixes.add(prefix.name)
            self._known = known
        try:
            yield
        finally:
            self._known = None

    def _tmpfile(self) -> int:
        return os.open(self.dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644)

    def _reopen_readonly(self, fd: int) -> int:
        """A read-only fd on the same inode; the caller closes the writable one (verity wants no writers)."""
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)

    def _finalize(self, fd: int, method: Method, size: int, object_id: str | None = None) -> ObjectResult:
        """Seal a written tmpfile and link it into place; closes fd.

        `object_id` is given by insecure callers that digested the same content already; otherwise
        fs-verity is enabled and the kernel's measurement is the ID.
        """
        if object_id is None and not self.insecure:
            # fs-verity can only be enabled with no writable fd open on the file.
            ro = self._reopen_readonly(fd)
            os.close(fd)
            fd = ro
        try:
            if object_id is None:
                object_id = self._seal(fd).hex()
            if self._link(fd, object_id):
                return ObjectResult(object_id, method, size)
            return ObjectResult(object_id, Method.PRESENT, size)
        finally:
            os.close(fd)

    def _seal(self, ro: int) -> bytes:
        """The object's ID: the kernel's measurement after enabling verity, or a userspace digest."""
        if self.insecure:
            return verity.digest_fd(ro, self.alg)
        try:
            verity.enable(ro, self.alg)
        except verity.VerityUnsupported as e:
            raise UserError(
                f"{self.root}: repository requires fs-verity but the filesystem has none ({e}); "
                "re-create it with --insecure"
            ) from e
        measured = verity.measure(ro)
        if measured is None or measured[0] is not self.alg:
            raise UserError(
                f"{self.root}: fs-verity was enabled but the kernel reports no {self.alg.label} digest"
            )
        return measured[1]

    def _link(self, fd: int, object_id: str) -> bool:
        """linkat the inode behind fd to its object path; False if the object already exists."""
        prefix = f"{self._dir_str}/{object_id[:2]}"
        if object_id[:2] not in self._prefixes:
            os.makedirs(prefix, exist_ok=True)
            self._prefixes.add(object_id[:2])
        dest = f"{prefix}/{object_id[2:]}"
        faults.point("object-before-link")
        try:
            link_fd_within(fd, dest, self.dir)
        except FileExistsError:
            if self._intact(dest, os.fstat(fd).st_size):
                return False
            # A leftover whose data a power cut lost (named, but its size is not the content's,
            # typically 0): this inode replaces it, atomically.
            spare = f"{prefix}/.replace-{os.getpid()}-{object_id[2:18]}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spare)
            link_fd_within(fd, spare, self.dir)
            os.rename(spare, dest)
        if self._known is not None:
            self._known.add(object_id)
        faults.point("object-after-link")
        return True

    @staticmethod
    def _intact(path: str, size: int) -> bool:
        """Whether the object at `path` has the content's size (a stat, no data read)."""
        try:
            return os.stat(path).st_size == size
        except FileNotFoundError:
            return False

    def present(self, object_id: str, size: int) -> bool:
        """The object exists with the content's size: not a leftover a power cut emptied."""
        if self._known is not None and object_id not in self._known:
            return False
        return self._intact(f"{self._dir_str}/{object_id[:2]}/{object_id[2:]}", size)

    def ensure_object(self, data: bytes) -> ObjectResult:
        """Store bytes as an object (written, not shared)."""
        object_id = verity.digest_bytes(data, self.alg).hex()
        if self.present(object_id, len(data)):
            return ObjectResult(object_id, Method.PRESENT, len(data))
        try:
            fd = self._tmpfile()
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except BaseException:
                os.close(fd)
                raise
            # Insecure: the userspace digest above is the ID. With verity, the kernel's measurement
            # of the written file must agree with it.
            result = self._finalize(fd, Method.COPIED, len(data), object_id if self.insecure else None)
        except OSError as e:
            raise UserError(f"{self.dir}: writing an object: {e.strerror or e}") from e
        if result.object_id != object_id:
            raise UserError(
                f"{self.root}: object digest changed while writing ({object_id} != {result.object_id})"
            )
        return result

    def ensure_object_from_file(
        self, path: Path | bytes, zerocopy_only: bool = False, digest: FileDigest | None = None
    ) -> ObjectResult:
        """Store a file's content as an object: reflink, else hardlink, else copy.

        Hardlink is taken only on the same filesystem and only where fs-verity can be enabled on the
        source (or the repository is insecure). With `zerocopy_only`, refuse to copy. `digest`: the
        file's userspace digest computed elsewhere (a DigestPool), used by an insecure repository
        if it matches the file opened here.
        """
        src, st = open_source_stat(path)
        try:
            return self.ensure_object_from_fd(src, st, path, zerocopy_only, digest)
        finally:
            os.close(src)

    def ensure_object_from_fd(
        self,
        src: int,
        st: os.stat_result,
        path: Path | bytes,
        zerocopy_only: bool = False,
        digest: FileDigest | None = None,
    ) -> ObjectResult:
        """ensure_object_from_file() for a regular file the caller opened (read-only) and fstat'ed."""
        try:
            return self._from_fd(src, st, path, zerocopy_only, digest)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # the repository's filesystem, not the source
                raise UserError(f"{self.dir}: {e.strerror} (adding {_shown(path)})") from e
            raise UserError(f"{_shown(path)}: {e.strerror or e}") from e

    def _from_fd(
        self, src: int, st: os.stat_result, path: Path | bytes, zerocopy_only: bool, digest: FileDigest | None
    ) -> ObjectResult:
        size = st.st_size
        # An insecure repository's IDs are userspace digests: take it from the source (whose pages are
        # likely cached), or from a DigestPool's digest of this very file, and skip all work for an
        # object that exists. With fs-verity the kernel measures the new inode instead.
        known_id: str | None = None
        if self.insecure:
            if digest is not None and digest.matches(st):
                known_id = digest.digest.hex()
            else:
                known_id = verity.digest_fd(src, self.alg).hex()
        # Where the next step is a hardlink, linkat itself says whether the object exists (one
        # syscall less per file); before a reflink or a copy, look first.
        hardlink_next = st.st_dev == self._dev and self._reflink_probe.known_unsupported(st.st_dev, self._dev)
        if known_id is not None and not hardlink_next and self.present(known_id, size):
            return ObjectResult(known_id, Method.PRESENT, size)

        if not self._reflink_probe.known_unsupported(st.st_dev, self._dev):
            tmp = self._tmpfile()
            try:
                cloned = zerocopy.reflink(src, tmp, self._reflink_probe, (st.st_dev, self._dev))
            except BaseException:
                os.close(tmp)
                raise
            if cloned:
                return self._finalize(tmp, Method.REFLINKED, size, known_id)
            os.close(tmp)

        if st.st_dev == self._dev:
            object_id = known_id or self._verity_source_digest(src)
            if object_id is not None:
                if self._link(src, object_id):
                    return ObjectResult(object_id, Method.HARDLINKED, size)
                return ObjectResult(object_id, Method.PRESENT, size)

        if zerocopy_only:
            if st.st_dev != self._dev:
                raise UserError(
                    f"{_shown(path)}: cannot add without copying: it is on another filesystem than the "
                    "repository"
                )
            raise UserError(
                f"{_shown(path)}: cannot add without copying: the filesystem cannot reflink, and fs-verity "
                "cannot be enabled on the file for a hardlink (the repository is not --insecure)"
            )
        tmp = self._tmpfile()
        try:
            zerocopy.copy_data(src, tmp, size)
        except BaseException:
            os.close(tmp)
            raise
        return self._finalize(tmp, Method.COPIED, size, known_id)

    def _verity_source_digest(self, src: int) -> str | None:
        """Enable fs-verity on the source in place (immutable from then on) and return the kernel's
        measurement, or None where that is impossible and the source must not be hardlinked.

        ext4 stamps the file's mtime when it enables fs-verity; the source belongs to someone else
        (podman's layer, whose mtimes are part of the image), so its times are put back."""
        before = os.fstat(src)
        try:
            enabled = verity.enable(src, self.alg)
            measured = verity.measure(src)
        except (verity.VerityUnsupported, OSError):
            return None  # no verity here, or a writer has the file open (ETXTBSY)
        if enabled and os.fstat(src).st_mtime_ns != before.st_mtime_ns:
            os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))
        if measured is None or measured[0] is not self.alg:
            return None
        return measured[1].hex()
