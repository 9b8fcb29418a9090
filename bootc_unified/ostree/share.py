"""Share the data of an ostree repository's content objects with the bootc store's diff/ files of
the same content, after the fact (for objects an earlier, plain commit wrote).

For each regular file of the merged tree (tree.py: its ostree checksum and the diff/ file holding
its bytes) whose object exists:

- FIDEDUPERANGE from the object into the diff/ file (btrfs, XFS): the kernel compares the bytes
  and makes the diff/ file use the object's extents; the object inode (and so every deployment
  checked out as hardlinks of it) is not touched;
- where the filesystem cannot dedupe (ext4): the diff/ file's names are replaced, by one rename
  each (dedupe.Staging, whose journal puts the directories' times back after a crash), by
  hardlinks to the object, when that is exact: same bytes (the object's checksum recomputed with
  the diff/ file's data), the same owner, mode and xattrs (ostree's checksum covers them), and the
  same mtime, or an object mtime of 0 (ostree's own, shared with no store file yet), which then
  takes the diff/ file's mtime, as objects the import hardlinks have it. Otherwise it stays a copy,
  counted with the reason.

Counts in dedupe.DedupeStats, as the composefs side reports them.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from bootc_unified import dedupe
from bootc_unified.errors import UserError

from .gvariant import regular_checksum_fd
from .repo import OstreeRepo, fd_xattrs
from .tree import File, MergedTree

_NO_DEDUPE = {errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EXDEV, errno.EINVAL}


@dataclass(frozen=True)
class _Pair:
    checksum: str
    diff: Path
    size: int


def _pairs(tree: MergedTree) -> list[_Pair]:
    seen: set[tuple[str, Path]] = set()
    out = []
    for _path, node in tree.walk():
        if isinstance(node, File) and node.source is not None and (node.checksum, node.source) not in seen:
            seen.add((node.checksum, node.source))
            out.append(_Pair(node.checksum, node.source, node.size))
    return out


def _same_extents(a: int, b: int) -> bool | None:
    try:
        ea, eb = dedupe.extents(a), dedupe.extents(b)
    except OSError:
        return False
    if any(f & dedupe.FIEMAP_EXTENT_DATA_INLINE for _, _, f in ea + eb):
        return None
    return bool(ea) and [(p, n) for p, n, _ in ea] == [(p, n) for p, n, _ in eb]


class _Unsupported(Exception):
    pass


def _dedupe_one(repo: OstreeRepo, pair: _Pair, stats: dedupe.DedupeStats) -> None:
    src = os.open(repo.object_path(pair.checksum), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst = os.open(pair.diff, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        os.close(src)
        raise UserError(f"{pair.diff}: {e.strerror}") from e
    try:
        if os.fstat(src).st_ino == os.fstat(dst).st_ino and os.fstat(src).st_dev == os.fstat(dst).st_dev:
            stats.already.add(pair.size)
            return
        same = _same_extents(src, dst)
        if same is None:
            stats.still("data inline in filesystem metadata (cannot be shared)", pair.size)
            return
        if same:
            stats.already.add(pair.size)
            return
        try:
            done, why = dedupe.dedupe_range(src, dst, pair.size)
        except OSError as e:
            if e.errno in _NO_DEDUPE:
                raise _Unsupported(e.strerror) from e
            stats.still(f"the kernel refused: {e.strerror}", pair.size)
            return
        stats.bytes_deduped += done
        if why is None:
            stats.shared.add(pair.size)
        else:
            stats.still(why, pair.size - done)
    finally:
        os.close(src)
        os.close(dst)


def _layer_diff_dir(path: Path) -> Path:
    for parent in path.parents:
        if parent.name == "diff":
            return parent
    raise UserError(f"{path}: not under a layer's diff/ directory")


def _link_plan(
    repo: OstreeRepo, pairs: list[_Pair], stats: dedupe.DedupeStats
) -> list[tuple[Path, list[Path], int | None]]:
    """(object, the diff/ names to link to it, the mtime to give the object first or None)."""
    plan: list[tuple[Path, list[Path], int | None]] = []
    claimed: dict[str, int] = {}  # object checksum -> the mtime it has from now on
    seen: set[tuple[int, int]] = set()
    for pair in pairs:
        obj = repo.object_path(pair.checksum)
        st, ost = os.lstat(pair.diff), os.lstat(obj)
        if (st.st_dev, st.st_ino) == (ost.st_dev, ost.st_ino):
            stats.already.add(pair.size)
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        if st.st_dev != ost.st_dev:
            stats.still("on another filesystem than the repository", pair.size)
            continue
        if (st.st_uid, st.st_gid, st.st_mode) != (ost.st_uid, ost.st_gid, ost.st_mode):
            stats.still("owner or mode differs from its object's", pair.size)
            continue
        fd = os.open(pair.diff, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            xattrs = fd_xattrs(fd)
            if xattrs != _xattrs_of(obj):
                stats.still("xattrs differ from its object's", pair.size)
                continue
            if regular_checksum_fd(fd, st.st_uid, st.st_gid, st.st_mode, xattrs) != pair.checksum:
                stats.still("content differs from the object", pair.size)
                continue
        finally:
            os.close(fd)
        mtime = claimed.get(pair.checksum, ost.st_mtime_ns)
        fix: int | None = None
        if mtime != st.st_mtime_ns:
            if mtime != 0 or pair.checksum in claimed:
                stats.still("mtime differs from its object's, which other files share", pair.size)
                continue
            fix = st.st_mtime_ns
        names = [pair.diff]
        if st.st_nlink > 1:
            names = dedupe._names_of_inode(_layer_diff_dir(pair.diff), st.st_ino, st.st_dev)
            if len(names) != st.st_nlink:
                stats.still("hardlinked outside its layer", pair.size)
                continue
        claimed[pair.checksum] = st.st_mtime_ns
        seen.add((st.st_dev, st.st_ino))
        plan.append((obj, names, fix))
        stats.shared.add(pair.size)
        stats.bytes_deduped += pair.size
    return plan


def _xattrs_of(path: Path) -> dict[bytes, bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return fd_xattrs(fd)
    finally:
        os.close(fd)


def share_objects(repo: OstreeRepo, tree: MergedTree, staging: Path) -> dedupe.DedupeStats:
    """Share each of the tree's diff/ files with its object (see the module docstring)."""
    stats = dedupe.DedupeStats()
    stage = dedupe.Staging(staging)
    stage.recover()
    pairs = [p for p in _pairs(tree) if repo.has_object(p.checksum)]
    for pair in pairs:
        stats.files.add(pair.size)
    can_dedupe: bool | None = None
    rest: list[_Pair] = []
    for pair in pairs:
        if can_dedupe is False:
            rest.append(pair)
            continue
        try:
            _dedupe_one(repo, pair, stats)
            can_dedupe = True
        except _Unsupported:
            can_dedupe = False
            rest.append(pair)
    plan = _link_plan(repo, rest, stats) if rest else []
    if plan:
        times = stage.record({p.parent for _, names, _ in plan for p in names})
        try:
            for obj, names, mtime in plan:
                if mtime is not None:
                    os.utime(obj, ns=(os.lstat(obj).st_atime_ns, mtime), follow_symlinks=False)
                for name in names:
                    stage.link_over(obj, name)
        finally:
            stage.done(times)
    stats.method = {None: "none", True: "dedupe", False: "hardlink"}[can_dedupe]
    return stats
