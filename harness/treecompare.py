"""Compare filesystem trees path by path: a directory on disk (podman's view of an image, or our
EROFS image mounted by the kernel) against another, or against an in-memory tree.

Each path becomes a record of type, mode, owner, size, content sha256, symlink target, rdev and
xattrs (minus overlayfs internals); hardlink groups are compared as sets of paths.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bootc_unified.erofs import tree as t

HIDDEN_XATTR_PREFIXES = (b"trusted.overlay.",)


@dataclass(frozen=True)
class Record:
    kind: str
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int | None
    sha256: str | None
    target: bytes | None
    rdev: int | None
    xattrs: tuple[tuple[bytes, bytes], ...]


@dataclass
class Snapshot:
    records: dict[bytes, Record]
    hardlinks: list[list[bytes]]


def _visible(xattrs: dict[bytes, bytes]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple(sorted((k, v) for k, v in xattrs.items() if not k.startswith(HIDDEN_XATTR_PREFIXES)))


_KIND = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def _sha256_file(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _paths(root: bytes) -> list[tuple[bytes, bytes]]:
    """(path relative to root as b"/a/b", full path) for root and everything under it."""
    out = [(b"/", root)]
    stack = [(b"", root)]
    while stack:
        rel, full = stack.pop()
        with os.scandir(full) as it:
            for entry in it:
                child = (rel + b"/" + entry.name, entry.path)
                out.append(child)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(child)
    return out


def snapshot_dir(root: Path) -> Snapshot:
    """Records for every path under `root` (the root itself is b"/")."""
    records: dict[bytes, Record] = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}
    for rel, full in _paths(os.fsencode(root)):
        st = os.lstat(full)
        fmt = stat.S_IFMT(st.st_mode)
        try:
            names = os.listxattr(full, follow_symlinks=False)
            xattrs = {os.fsencode(n): os.getxattr(full, n, follow_symlinks=False) for n in names}
        except OSError:
            xattrs = {}
        records[rel] = Record(
            kind=_KIND[fmt],
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if fmt == stat.S_IFREG else None,
            sha256=_sha256_file(full) if fmt == stat.S_IFREG else None,
            target=os.readlink(full) if fmt == stat.S_IFLNK else None,
            rdev=st.st_rdev if fmt in (stat.S_IFCHR, stat.S_IFBLK) else None,
            xattrs=_visible(xattrs),
        )
        if fmt != stat.S_IFDIR and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    return Snapshot(records, sorted(sorted(g) for g in inodes.values() if len(g) > 1))


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
            kind=_KIND[stat.S_IFMT(node.mode)],
            mode=stat.S_IMODE(node.mode),
            uid=node.uid,
            gid=node.gid,
            size=size,
            sha256=sha,
            target=target,
            rdev=rdev,
            xattrs=_visible(node.xattrs),
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
