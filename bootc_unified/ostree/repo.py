"""An ostree repository in mode `bare`, driven through the `ostree` CLI, plus what the CLI cannot do:
placing content objects without writing their data (reflink, else a hardlink to an inode whose
metadata is already the object's, else a copy).

A bare content object is `objects/XX/<62 hex>.file`: a regular file (or symlink) whose owner, mode
and xattrs are the object's own and whose mtime ostree sets to 0. Objects are made in an O_TMPFILE
in the repository's `tmp/` and linked into place only when complete, so a crash leaves nothing
`ostree fsck` would reject. While objects are placed and the commit is written, a shared lock on
the repository's `.lock` (an OFD lock, as libostree takes it) keeps `ostree prune`, which takes it
exclusively, from removing objects no commit names yet.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import re
import stat
import struct
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bootc_unified import faults, zerocopy
from bootc_unified.errors import UserError, tool_error_line

from .gvariant import regular_checksum_fd

F_OFD_SETLKW = 38
OSTREE_TIMESTAMP = 0  # the mtime ostree gives bare objects


class Placed(enum.Enum):
    REFLINKED = "reflinked"
    HARDLINKED = "hardlinked"
    COPIED = "copied"
    PRESENT = "already-present"
    WRITTEN = "written"  # symlink objects: no data to share


@dataclass(frozen=True)
class FileMeta:
    """What a content object's checksum covers besides its bytes."""

    uid: int
    gid: int
    mode: int  # full st_mode: S_IFREG or S_IFLNK | permission bits
    xattrs: Mapping[bytes, bytes]


def run_ostree(*args: str | os.PathLike[str], what: str) -> str:
    """Run `ostree ARGS`, returning stdout; a failure is a one-line UserError naming `what`."""
    try:
        proc = subprocess.run(
            ["ostree", *map(str, args)], capture_output=True, text=True, errors="backslashreplace"
        )
    except FileNotFoundError as e:
        raise UserError("ostree not found: install the `ostree` package") from e
    if proc.returncode != 0:
        raise UserError(f"{what}: ostree {args[0]}: {tool_error_line(proc.stderr)}")
    return proc.stdout


def ostree_version() -> tuple[int, int]:
    """(year, release) of the installed ostree, e.g. (2022, 7)."""
    out = run_ostree("--version", what="ostree --version")
    m = re.search(r"Version:\s*'?(\d+)\.(\d+)", out)
    if m is None:
        raise UserError(f"ostree --version: no version in {out.strip()[:80]!r}")
    return int(m.group(1)), int(m.group(2))


def fd_xattrs(fd: int) -> dict[bytes, bytes]:
    """A file's xattrs as ostree reads them from disk (libglnx skips empty values)."""
    pairs = ((n, os.getxattr(fd, n)) for n in os.listxattr(fd))
    return {os.fsencode(n): v for n, v in pairs if v}


class OstreeRepo:
    """A bare ostree repository at `path` (its `objects/`, `tmp/`, refs through the CLI)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.objects = self.path / "objects"
        self.tmp = self.path / "tmp"
        self._dev = os.stat(self.objects).st_dev
        self._probe = zerocopy.ReflinkProbe()
        self._prefixes: set[str] = set()

    @classmethod
    def init(cls, path: Path) -> OstreeRepo:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        run_ostree("init", f"--repo={path}", "--mode=bare", what=str(path))
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> OstreeRepo:
        path = Path(path)
        config = path / "config"
        if not config.is_file() or not (path / "objects").is_dir():
            raise UserError(f"{path}: not an ostree repository (no config or objects/)")
        m = re.search(r"^mode\s*=\s*(\S+)", config.read_text(errors="replace"), re.M)
        mode = m.group(1) if m else "bare"
        if mode != "bare":
            raise UserError(f"{path}: ostree repository in mode {mode}; zero-copy import needs mode bare")
        (path / "tmp").mkdir(exist_ok=True)
        return cls(path)

    # --- locking ---------------------------------------------------------------------------

    @contextmanager
    def shared_lock(self) -> Iterator[None]:
        """libostree's shared repository lock (OFD read lock on `.lock`), held while we write."""
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            flock = struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0)
            fcntl.fcntl(fd, F_OFD_SETLKW, flock)
            yield
        finally:
            os.close(fd)  # closing the last fd of the description drops its OFD lock

    # --- objects ---------------------------------------------------------------------------

    def object_path(self, checksum: str) -> Path:
        return self.objects / checksum[:2] / f"{checksum[2:]}.file"

    def has_object(self, checksum: str) -> bool:
        return os.path.lexists(self.object_path(checksum))

    def _dest(self, checksum: str) -> str:
        prefix = checksum[:2]
        if prefix not in self._prefixes:
            (self.objects / prefix).mkdir(exist_ok=True)
            self._prefixes.add(prefix)
        return str(self.object_path(checksum))

    def _link(self, fd: int, checksum: str) -> bool:
        """linkat the inode behind `fd` to the object path; False when the object exists already."""
        from bootc_unified.repository.objects import link_fd_within

        dest = self._dest(checksum)
        faults.point("ostree-object-before-link")
        try:
            link_fd_within(fd, dest, self.objects)
        except FileExistsError:
            return False
        return True

    @staticmethod
    def _apply_meta(fd: int, meta: FileMeta) -> None:
        os.fchown(fd, meta.uid, meta.gid)
        os.fchmod(fd, stat.S_IMODE(meta.mode))  # after chown, which clears setuid/setgid
        for name, value in meta.xattrs.items():
            os.setxattr(fd, name, value)
        os.utime(fd, ns=(OSTREE_TIMESTAMP, OSTREE_TIMESTAMP))

    def place_regular(self, source: Path, checksum: str, meta: FileMeta, size: int) -> Placed:
        """Make `checksum` an object holding `source`'s bytes with `meta`: reflink into a tmpfile
        with the metadata applied, else hardlink `source` itself when its owner, mode and xattrs
        are exactly `meta`, else copy. The object is checked against `checksum` before it is linked."""
        if self.has_object(checksum):
            return Placed.PRESENT
        try:
            src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise UserError(f"{source}: {e.strerror}") from e
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                raise UserError(f"{source}: not a regular file")
            if st.st_size != size:
                raise UserError(f"{source}: diff file is {st.st_size} bytes, the layer says {size}")
            if not self._probe.known_unsupported(st.st_dev, self._dev):
                tmp = self._tmpfile()
                try:
                    if zerocopy.reflink(src, tmp, self._probe, (st.st_dev, self._dev)):
                        return self._finish(tmp, checksum, meta, Placed.REFLINKED, source)
                finally:
                    os.close(tmp)
            if st.st_dev == self._dev and self._meta_matches(src, st, meta):
                got = regular_checksum_fd(src, meta.uid, meta.gid, meta.mode, meta.xattrs)
                if got != checksum:
                    raise UserError(f"{source}: content changed while importing (checksum {got})")
                return Placed.HARDLINKED if self._link(src, checksum) else Placed.PRESENT
            tmp = self._tmpfile()
            try:
                zerocopy.copy_data(src, tmp, size)
                return self._finish(tmp, checksum, meta, Placed.COPIED, source)
            finally:
                os.close(tmp)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(f"{self.path}: {e.strerror} (adding {source})") from e
            raise UserError(f"{source}: {e.strerror or e}") from e
        finally:
            os.close(src)

    @staticmethod
    def _meta_matches(fd: int, st: os.stat_result, meta: FileMeta) -> bool:
        if (st.st_uid, st.st_gid, st.st_mode) != (meta.uid, meta.gid, meta.mode):
            return False
        return fd_xattrs(fd) == dict(meta.xattrs)

    def _tmpfile(self) -> int:
        return os.open(self.tmp, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)

    def _finish(self, tmp: int, checksum: str, meta: FileMeta, how: Placed, source: Path) -> Placed:
        self._apply_meta(tmp, meta)
        got = regular_checksum_fd(tmp, meta.uid, meta.gid, meta.mode, fd_xattrs(tmp))
        if got != checksum:
            raise UserError(f"{source}: the object made from it has checksum {got}, expected {checksum}")
        return how if self._link(tmp, checksum) else Placed.PRESENT

    def place_empty(self, checksum: str, meta: FileMeta) -> Placed:
        """An empty regular file object (no data to share)."""
        if self.has_object(checksum):
            return Placed.PRESENT
        try:
            tmp = self._tmpfile()
            try:
                return (
                    Placed.WRITTEN
                    if self._finish(tmp, checksum, meta, Placed.WRITTEN, self.tmp) is Placed.WRITTEN
                    else Placed.PRESENT
                )
            finally:
                os.close(tmp)
        except OSError as e:
            raise UserError(f"{self.path}: writing object {checksum}: {e.strerror or e}") from e

    def place_symlink(self, checksum: str, target: bytes, meta: FileMeta) -> Placed:
        """A symlink object: made under a temporary name in tmp/, owned and labelled, then renamed
        into place (a symlink cannot be an O_TMPFILE)."""
        if self.has_object(checksum):
            return Placed.PRESENT
        tmp = self.tmp / f"symlink-{os.getpid()}-{checksum}"
        try:
            tmp.unlink(missing_ok=True)
            os.symlink(target, tmp)
            os.chown(tmp, meta.uid, meta.gid, follow_symlinks=False)
            for name, value in meta.xattrs.items():
                os.setxattr(tmp, name, value, follow_symlinks=False)
            os.utime(tmp, ns=(OSTREE_TIMESTAMP, OSTREE_TIMESTAMP), follow_symlinks=False)
            dest = self._dest(checksum)
            try:
                os.link(tmp, dest, follow_symlinks=False)
            except FileExistsError:
                return Placed.PRESENT
            return Placed.WRITTEN
        except OSError as e:
            raise UserError(f"{self.path}: writing symlink object {checksum}: {e.strerror or e}") from e
        finally:
            tmp.unlink(missing_ok=True)

    # --- commits and refs ------------------------------------------------------------------

    def commit_tree(
        self,
        tree: Path,
        branch: str | None,
        timestamp: int,
        metadata: Mapping[str, str],
        metadata_variants: Mapping[str, str],
    ) -> str:
        """`ostree commit --tree=dir=TREE --link-checkout-speedup`: files that are hardlinks of our
        objects are found by (device, inode), so only dirtree, dirmeta and commit objects are written."""
        args: list[str] = [
            "commit",
            f"--repo={self.path}",
            f"--tree=dir={tree}",
            "--link-checkout-speedup",
            "--no-bindings",
            f"--timestamp=@{timestamp}",
        ]
        args += [f"--branch={branch}"] if branch else ["--orphan"]
        args += [f"--add-metadata-string={k}={v}" for k, v in metadata.items()]
        args += [f"--add-metadata={k}={v}" for k, v in metadata_variants.items()]
        return run_ostree(*args, what=str(self.path)).strip()

    def resolve(self, ref: str) -> str | None:
        proc = subprocess.run(
            ["ostree", "rev-parse", f"--repo={self.path}", ref], capture_output=True, text=True
        )
        return proc.stdout.strip() if proc.returncode == 0 else None

    def refs(self, prefix: str | None = None) -> list[str]:
        out = run_ostree("refs", f"--repo={self.path}", *([prefix] if prefix else []), what=str(self.path))
        names = [line.strip() for line in out.splitlines() if line.strip()]
        return [f"{prefix}/{n}" for n in names] if prefix else names

    def set_ref(self, ref: str, commit: str) -> None:
        run_ostree("refs", f"--repo={self.path}", "--force", f"--create={ref}", commit, what=str(self.path))

    def root_checksums(self, rev: str) -> tuple[str, str]:
        """(dirtree, dirmeta) checksums of the commit's root directory."""
        out = run_ostree("ls", f"--repo={self.path}", "-C", "-d", rev, "/", what=str(self.path))
        fields = out.split()
        hexes = [f for f in fields if re.fullmatch(r"[0-9a-f]{64}", f)]
        if len(hexes) < 2:
            raise UserError(f"{self.path}: unexpected `ostree ls -C` output {out.strip()!r}")
        return hexes[0], hexes[1]

    def fsck(self) -> None:
        run_ostree("fsck", f"--repo={self.path}", what=str(self.path))
