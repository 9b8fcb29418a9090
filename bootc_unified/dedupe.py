"""Make an image's files in a containers-storage share their data with the repository's objects.

When an image the repository already holds (imported earlier from a store that is gone) is put into
the bootc store again (`image set-unified`), every file's data is on disk twice: in
`overlay/<layer>/diff/` and as `objects/XX/...`. This module pairs each diff/ file with its object
(the layer's tar-split entries in order against the layer splitstream's external chunks, sizes
checked) and drops the second copy of the data without changing what either side shows:

- **dedupe** (btrfs, XFS): FIDEDUPERANGE with the object as source and the diff file as
  destination. The kernel compares the bytes itself under its own locks and only then points the
  destination at the source's extents; no content, metadata or inode changes. What it refuses is
  counted with its reason, not fatal. Files whose extents are already the object's are skipped.
- **hardlink** (no dedupe: ext4): the diff file is replaced by a hardlink to the object, the way
  the zero-copy importer shares them on such filesystems (it hardlinks objects to store files).
  Only when the object holds the file's data (the file's fs-verity digest, computed here, is the
  object ID) and the inode can carry the file's metadata (mode, owner, mtime, xattrs: what
  overlayfs shows): they are equal already, or the object has no other link, so its metadata
  (unused by composefs: the EROFS image carries the metadata) is set to the file's first. On a
  verity repository the diff file thereby becomes that verity inode, as after a unified install.
  The link is made in a staging directory and renamed over the diff file (never a moment without
  the file); a hardlink group inside the layer moves as a whole; the parent directories' times are
  written to a journal first and put back afterwards (by the next run, after a crash).

Small files (up to INLINE_MAX bytes) have no object (the repository keeps them inline): they are
counted, not duplicates of anything. The caller holds the store's read lock (no layer is removed
meanwhile) and the repository's writer lock (no object is collected).
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import secrets
import shutil
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bootc_unified import faults, verity
from bootc_unified.cstorage import Layer, Segment, read_entries
from bootc_unified.cstorage.reassemble import entry_content_path
from bootc_unified.erofs.tree import INLINE_MAX
from bootc_unified.errors import UserError
from bootc_unified.importer import layer_content_id
from bootc_unified.repository import Repository, splitstream

FIDEDUPERANGE = 0xC0189436  # _IOWR(0x94, 54, struct file_dedupe_range)
_RANGE = struct.Struct("=QQHHI")  # src_offset, src_length, dest_count, reserved1, reserved2
_INFO = struct.Struct("=qQQiI")  # dest_fd, dest_offset, bytes_deduped, status, reserved
FILE_DEDUPE_RANGE_DIFFERS = 1
DEDUPE_CHUNK = 16 << 20  # btrfs dedupes at most 16 MiB per call; ask for no more
# errnos meaning "this filesystem cannot dedupe at all": take the hardlink method instead.
_NO_DEDUPE = {errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EXDEV}

FS_IOC_FIEMAP = 0xC020660B
_FM_HEADER = struct.Struct("=QQLLLL")
_FM_EXTENT = struct.Struct("=QQQQQLLLL")
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_DATA_INLINE = 0x200

JOURNAL = "dirtimes.json"


@dataclass
class Tally:
    files: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.files += 1
        self.bytes += size


@dataclass
class DedupeStats:
    method: str = "none"  # "dedupe" (FIDEDUPERANGE) or "hardlink"
    files: Tally = field(default_factory=Tally)  # diff files that have an object
    shared: Tally = field(default_factory=Tally)  # now sharing their object's data (this run)
    already: Tally = field(default_factory=Tally)  # were sharing it before this run
    inline: Tally = field(default_factory=Tally)  # small files the repository keeps inline
    duplicated: dict[str, Tally] = field(default_factory=dict)  # reason -> still on disk twice
    bytes_deduped: int = 0  # what the kernel reported (dedupe) or the linked files' sizes

    def still(self, reason: str, size: int) -> None:
        self.duplicated.setdefault(reason, Tally()).add(size)

    @property
    def duplicated_bytes(self) -> int:
        return sum(t.bytes for t in self.duplicated.values())

    def to_json(self) -> dict[str, object]:
        def tally(t: Tally) -> dict[str, int]:
            return {"files": t.files, "bytes": t.bytes}

        return {
            "method": self.method,
            "files": tally(self.files),
            "shared": tally(self.shared),
            "already_shared": tally(self.already),
            "inline": tally(self.inline),
            "bytes_deduped": self.bytes_deduped,
            "duplicated": {k: tally(v) for k, v in sorted(self.duplicated.items())},
            "duplicated_bytes": self.duplicated_bytes,
        }

    def summary(self) -> str:
        dup = "; ".join(f"{r}: {t.files} files, {t.bytes} B" for r, t in sorted(self.duplicated.items()))
        return (
            f"Shared with the repository ({self.method}): {self.shared.files} files, "
            f"{self.bytes_deduped} B; already shared: {self.already.files} files, {self.already.bytes} B; "
            f"still duplicated: {self.duplicated_bytes} B{f' ({dup})' if dup else ''}"
        )


@dataclass(frozen=True)
class Pair:
    diff: Path  # the store's file
    object_id: str
    size: int


# --- pairing ------------------------------------------------------------------------------------------


def layer_pairs(repo: Repository, layer: Layer, stats: DedupeStats) -> list[Pair]:
    """Each diff/ file of `layer` with content over INLINE_MAX bytes and its object, from the
    layer's tar-split and the repository's stream of the same DiffID (UserError if they disagree)."""
    stream = repo.open_stream(layer_content_id(layer.diff_id), splitstream.OCI_LAYER)
    objects = [c for c in stream.chunks() if isinstance(c, str)]
    base = os.fsencode(layer.diff_path)
    pairs: list[Pair] = []
    for entry in read_entries(layer.tar_split_path, layer.label):
        if isinstance(entry, Segment) or entry.size == 0:
            continue
        if entry.size <= INLINE_MAX:
            stats.inline.add(entry.size)
            continue
        if len(pairs) == len(objects):
            raise UserError(f"layer {layer.label}: the repository's stream has fewer objects than files")
        path = Path(os.fsdecode(entry_content_path(base, entry, entry.where(layer.label))))
        pairs.append(Pair(path, objects[len(pairs)], entry.size))
    if len(pairs) != len(objects):
        raise UserError(f"layer {layer.label}: the repository's stream has more objects than files")
    return pairs


# --- what the kernel says --------------------------------------------------------------------------


def extents(fd: int) -> list[tuple[int, int, int]]:
    """(physical, length, flags) of every extent of an open file (FIEMAP, synced first)."""
    out: list[tuple[int, int, int]] = []
    start = 0
    while True:
        buf = array.array(
            "B",
            _FM_HEADER.pack(start, 2**64 - 1 - start, FIEMAP_FLAG_SYNC, 0, 64, 0)
            + bytes(_FM_EXTENT.size * 64),
        )
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = _FM_HEADER.unpack_from(buf, 0)[3]
        if mapped == 0:
            return out
        for i in range(mapped):
            logical, physical, length, _, _, flags, _, _, _ = _FM_EXTENT.unpack_from(
                buf, _FM_HEADER.size + i * _FM_EXTENT.size
            )
            out.append((physical, length, flags))
        if flags & FIEMAP_EXTENT_LAST:
            return out
        start = logical + length


def _same_extents(a: int, b: int) -> bool | None:
    """True when two files' data are the same extents; None when the data is inline (btrfs)."""
    try:
        ea, eb = extents(a), extents(b)
    except OSError:
        return False
    if any(f & FIEMAP_EXTENT_DATA_INLINE for _, _, f in ea + eb):
        return None
    return bool(ea) and [(p, n) for p, n, _ in ea] == [(p, n) for p, n, _ in eb]


def dedupe_range(src: int, dst: int, size: int) -> tuple[int, str | None]:
    """FIDEDUPERANGE of [0, size) from src into dst: (bytes deduped, why it stopped short or None).
    Raises OSError when the ioctl itself fails (EOPNOTSUPP: this filesystem cannot dedupe)."""
    done = 0
    while done < size:
        length = min(DEDUPE_CHUNK, size - done)
        buf = bytearray(_RANGE.pack(done, length, 1, 0, 0) + _INFO.pack(dst, done, 0, 0, 0))
        fcntl.ioctl(src, FIDEDUPERANGE, buf)
        _, _, deduped, status, _ = _INFO.unpack_from(buf, _RANGE.size)
        if status == FILE_DEDUPE_RANGE_DIFFERS:
            return done, "the kernel found the contents differ"
        if status < 0:
            return done, f"the kernel refused: {os.strerror(-status)}"
        if deduped == 0:
            return done, "the kernel deduplicated nothing"
        done += deduped
    return done, None


# --- the dedupe method --------------------------------------------------------------------------------


class _Unsupported(Exception):
    pass


def _dedupe_one(repo: Repository, pair: Pair, stats: DedupeStats) -> bool:
    """Dedupe one file; True when the kernel took the request (whatever it found), raises
    _Unsupported when this filesystem cannot dedupe at all."""
    try:
        src = os.open(repo.objects.path_of(pair.object_id), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UserError(f"{repo.path}: object {pair.object_id} is missing") from None
    try:
        dst = os.open(pair.diff, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        os.close(src)
        raise UserError(f"{pair.diff}: {e.strerror}") from e
    try:
        if os.fstat(dst).st_size != pair.size or os.fstat(src).st_size != pair.size:
            stats.still("size differs from tar-split or object", pair.size)
            return False
        same = _same_extents(src, dst)
        if same is None:
            stats.still("data inline in filesystem metadata (cannot be shared)", pair.size)
            return False
        if same:
            stats.already.add(pair.size)
            return False
        faults.point("dedupe-range")
        try:
            deduped, why = dedupe_range(src, dst, pair.size)
        except OSError as e:
            if e.errno in _NO_DEDUPE:
                raise _Unsupported(e.strerror) from e
            stats.still(f"the kernel refused: {e.strerror}", pair.size)
            return True
        stats.bytes_deduped += deduped
        if why is None:
            stats.shared.add(pair.size)
        else:
            stats.still(why, pair.size - deduped)
        return True
    finally:
        os.close(src)
        os.close(dst)


# --- the hardlink method ----------------------------------------------------------------------------


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            return {}
        raise
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}


@dataclass(frozen=True)
class Meta:
    """What overlayfs shows of a regular file besides its data."""

    mode: int
    uid: int
    gid: int
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...]

    @classmethod
    def of(cls, path: Path, st: os.stat_result) -> Meta:
        return cls(st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, tuple(sorted(_xattrs(path).items())))

    def apply(self, path: Path, atime_ns: int) -> None:
        os.chown(path, self.uid, self.gid, follow_symlinks=False)  # clears set-id bits and caps: first
        os.chmod(path, stat.S_IMODE(self.mode))
        want = dict(self.xattrs)
        for name in _xattrs(path):
            if name not in want:
                os.removexattr(path, name, follow_symlinks=False)
        for name, value in want.items():
            os.setxattr(path, name, value, follow_symlinks=False)
        os.utime(path, ns=(atime_ns, self.mtime_ns), follow_symlinks=False)


class Staging:
    """A directory on the store's filesystem for links on their way into diff/, and the journal of
    the directory times to put back; `recover()` finishes what a crashed run left."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def journal(self) -> Path:
        return self.path / JOURNAL

    def recover(self) -> None:
        if self.journal.exists():
            try:
                times = json.loads(self.journal.read_text())
            except ValueError:
                times = {}  # torn before its rename: nothing was changed under it
            for directory, (atime, mtime) in times.items():
                if os.path.isdir(directory):
                    os.utime(directory, ns=(atime, mtime), follow_symlinks=False)
        shutil.rmtree(self.path, ignore_errors=True)

    def record(self, dirs: set[Path]) -> dict[Path, tuple[int, int]]:
        times = {}
        for d in dirs:
            st = os.lstat(d)
            times[d] = (st.st_atime_ns, st.st_mtime_ns)
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{JOURNAL}.tmp"
        with open(tmp, "w") as f:
            json.dump({str(d): list(t) for d, t in times.items()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.journal)
        return times

    def done(self, times: dict[Path, tuple[int, int]]) -> None:
        for d, (atime, mtime) in times.items():
            os.utime(d, ns=(atime, mtime), follow_symlinks=False)
        shutil.rmtree(self.path, ignore_errors=True)

    def link_over(self, source: Path, dest: Path) -> None:
        """Make `dest` a hardlink of `source` by one rename (never a moment without `dest`)."""
        tmp = self.path / secrets.token_hex(8)
        os.link(source, tmp)
        faults.point("dedupe-before-rename")
        try:
            os.rename(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        faults.point("dedupe-after-rename")


def _names_of_inode(diff_dir: Path, ino: int, dev: int) -> list[Path]:
    found = []
    for dirpath, _dirs, names in os.walk(diff_dir):
        for name in names:
            p = Path(dirpath, name)
            st = os.lstat(p)
            if st.st_ino == ino and st.st_dev == dev:
                found.append(p)
    return sorted(found)


def _link_layer(
    repo: Repository, layer: Layer, pairs: list[Pair], stats: DedupeStats, staging: Staging
) -> None:
    """Replace the layer's diff files by hardlinks to their objects where that is exact."""
    plan: list[tuple[Path, list[Path], Meta | None]] = []  # object, names, metadata to give it first
    claimed: dict[str, Meta] = {}  # objects this run links: their metadata from now on
    seen: set[int] = set()
    for pair in pairs:
        st = os.lstat(pair.diff)
        obj = repo.objects.path_of(pair.object_id)
        try:
            ost = os.lstat(obj)
        except FileNotFoundError:
            raise UserError(f"{repo.path}: object {pair.object_id} is missing") from None
        if (st.st_dev, st.st_ino) == (ost.st_dev, ost.st_ino):
            stats.already.add(pair.size)
            continue
        if st.st_ino in seen:
            continue  # a second name of a group already planned (the tar lists its data once)
        if st.st_dev != ost.st_dev:
            stats.still("on another filesystem than the repository", pair.size)
            continue
        if st.st_size != pair.size or ost.st_size != pair.size:
            stats.still("size differs from tar-split or object", pair.size)
            continue
        names = [pair.diff]
        if st.st_nlink > 1:
            names = _names_of_inode(layer.diff_path, st.st_ino, st.st_dev)
            if len(names) != st.st_nlink:
                stats.still("hardlinked outside its layer", pair.size)
                continue
        if verity.digest_file(pair.diff, repo.alg).hex() != pair.object_id:
            stats.still("content differs from the object", pair.size)
            continue
        meta = Meta.of(pair.diff, st)
        current = claimed.get(pair.object_id) or Meta.of(obj, ost)
        fix: Meta | None = None
        if meta != current:
            if pair.object_id in claimed or ost.st_nlink != 1:
                stats.still("metadata differs from its object's, which other files share", pair.size)
                continue
            fix = meta
        claimed[pair.object_id] = meta
        seen.add(st.st_ino)
        plan.append((obj, names, fix))
        stats.shared.add(pair.size)
        stats.bytes_deduped += pair.size
    if not plan:
        return
    times = staging.record({p.parent for _, names, _ in plan for p in names})
    try:
        for obj, names, fix in plan:
            if fix is not None:
                fix.apply(obj, os.lstat(obj).st_atime_ns)
            for name in names:
                staging.link_over(obj, name)
    finally:
        staging.done(times)


# --- the entry point ---------------------------------------------------------------------------------


def share_layers(repo: Repository, layers: Iterable[Layer], staging: Path) -> DedupeStats:
    """Share every diff/ file of `layers` with its repository object (see the module docstring).

    FIDEDUPERANGE is tried first; the first file the filesystem cannot dedupe at all (EOPNOTSUPP)
    switches this and every later file to the hardlink method."""
    stats = DedupeStats()
    stage = Staging(staging)
    stage.recover()
    dedupe: bool | None = None  # can this filesystem dedupe? (None: not known yet)
    done: set[str] = set()
    for layer in layers:
        if layer.id in done:
            continue
        done.add(layer.id)
        pairs = layer_pairs(repo, layer, stats)
        for pair in pairs:
            stats.files.add(pair.size)
        rest = pairs
        if dedupe is not False:
            rest = []
            for pair in pairs:
                if dedupe is False:
                    rest.append(pair)
                    continue
                try:
                    if _dedupe_one(repo, pair, stats):
                        dedupe = True
                except _Unsupported:
                    dedupe = False
                    rest.append(pair)
        if rest:
            _link_layer(repo, layer, rest, stats, stage)
    stats.method = "hardlink" if dedupe is False else "dedupe"
    return stats
