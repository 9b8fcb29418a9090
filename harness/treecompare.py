"""Compare filesystem trees path by path: a directory on disk (podman's view of an image, or our
EROFS image mounted by the kernel) against another, or against an in-memory tree.

Each path becomes a record (harness.treewalk, which also runs inside guests) of type, mode,
owner, size, content sha256, symlink target, rdev, mtime (seconds and nanoseconds) and xattrs
(minus overlayfs internals); hardlink groups are compared as sets of paths.

Mtimes are compared to the nanosecond: both sides carry them honestly. A layer tar header has
whole seconds, a PAX `mtime` record adds the fraction; podman (Go's archive/tar, then Chtimes /
UtimesNano, directories after all their entries) keeps it, and so does our EROFS writer (an
extended inode stores mtime and mtime_nsec; a compact inode is only used when its mtime equals
the superblock's build time and nsec, which the kernel reports for it). Directories are compared
too: overlayfs reports a merged directory's stat from the topmost layer that has it, and the
flattener takes a directory's metadata from the last layer whose tar names it. Exceptions, left to
the caller: the root directory (its metadata is podman's own choice: the tests copy podman's root
record over ours), and a directory that a layer creates implicitly (a tar naming `a/b` without
`a/`), which podman stamps with the extraction time; the test images have none.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Callable

from bootc_unified.erofs import tree as t
from harness.treewalk import KIND, Record, Snapshot, read_xattrs, snapshot_dir, visible

__all__ = ["Record", "Snapshot", "differences", "read_xattrs", "snapshot_dir", "snapshot_tree"]


def snapshot_tree(root: t.Directory, read_object: Callable[[str], bytes]) -> Snapshot:
    """Records for an in-memory tree; external contents are read with `read_object(object_id)`."""
    records: dict[bytes, Record] = {}
    for path, node in t.walk(root):
        sha = size = target = rdev = None
        if isinstance(node, t.Regular):
            size = node.size
            data = node.data if node.object_id is None else read_object(node.object_id)
            sha = hashlib.sha256(data or b"").hexdigest()
        elif isinstance(node, t.Symlink):
            target = node.target
        elif isinstance(node, t.Device):
            rdev = node.rdev
        records[path] = Record(
            kind=KIND[stat.S_IFMT(node.mode)],
            mode=stat.S_IMODE(node.mode),
            uid=node.uid,
            gid=node.gid,
            size=size,
            sha256=sha,
            target=target,
            rdev=rdev,
            mtime=node.mtime,
            mtime_nsec=node.mtime_nsec,
            xattrs=visible(node.xattrs),
        )
    return Snapshot(records, t.hardlink_groups(root))


def differences(expected: Snapshot, actual: Snapshot, limit: int = 20) -> list[str]:
    """Human-readable differences (empty when the trees are equal)."""
    out: list[str] = []
    for path in sorted(set(expected.records) | set(actual.records)):
        a, b = expected.records.get(path), actual.records.get(path)
        if a != b:
            out.append(f"{path!r}: expected {a}, got {b}")
        if len(out) >= limit:
            return out
    if expected.hardlinks != actual.hardlinks:
        out.append(f"hardlink groups: expected {expected.hardlinks}, got {actual.hardlinks}")
    return out
