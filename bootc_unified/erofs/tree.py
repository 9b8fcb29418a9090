"""The in-memory filesystem tree: what the importer hands the EROFS writer, and what the reader returns.

Every node carries its full inode metadata. Names are bytes (they need not be UTF-8). A hardlink
is the same leaf object placed under several names; the writer gives it one inode whose nlink
counts the names. Regular files of at most INLINE_MAX bytes carry their content (`data`); larger
ones carry the hex fs-verity digest of their content (`object_id`), which names the object in the
repository's objects/ directory.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

INLINE_MAX = 64  # regular files up to this size are stored in the image itself


@dataclass(kw_only=True)
class Inode:
    """Metadata common to every node. `mode` is the full st_mode, file type bits included."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


@dataclass(kw_only=True)
class Directory(Inode):
    entries: dict[bytes, Node] = field(default_factory=dict)


@dataclass(kw_only=True)
class Regular(Inode):
    size: int
    data: bytes | None = None  # the content, when size <= INLINE_MAX
    object_id: str | None = None  # hex fs-verity digest of the content, when size > INLINE_MAX


@dataclass(kw_only=True)
class Symlink(Inode):
    target: bytes


@dataclass(kw_only=True)
class Device(Inode):
    """A character or block device (the mode says which); rdev as st_rdev encodes it."""

    rdev: int


@dataclass(kw_only=True)
class Fifo(Inode):
    pass


@dataclass(kw_only=True)
class Socket(Inode):
    pass


Node = Directory | Regular | Symlink | Device | Fifo | Socket
Leaf = Regular | Symlink | Device | Fifo | Socket


def walk(root: Directory, prefix: bytes = b"") -> Iterator[tuple[bytes, Node]]:
    """(path, node) for every node, parents before children, names in bytewise order; root is b"/"."""
    yield prefix or b"/", root
    for name in sorted(root.entries):
        node = root.entries[name]
        path = prefix + b"/" + name
        if isinstance(node, Directory):
            yield from walk(node, path)
        else:
            yield path, node


def hardlink_groups(root: Directory) -> list[list[bytes]]:
    """Paths that name the same leaf object, for leaves with more than one name (sorted)."""
    by_id: dict[int, list[bytes]] = {}
    for path, node in walk(root):
        if not isinstance(node, Directory):
            by_id.setdefault(id(node), []).append(path)
    return sorted(paths for paths in by_id.values() if len(paths) > 1)


def object_ids(root: Directory) -> set[str]:
    """Every object ID the tree references."""
    return {
        node.object_id for _, node in walk(root) if isinstance(node, Regular) and node.object_id is not None
    }


ObjectIdOf = Callable[[Path], str]


class InodeMeta(TypedDict):
    """The keyword arguments of Inode, for building nodes of any kind."""

    mode: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    xattrs: dict[bytes, bytes]


def _meta(st: os.stat_result, xattrs: dict[bytes, bytes]) -> InodeMeta:
    return {
        "mode": st.st_mode,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime": st.st_mtime_ns // 1_000_000_000,
        "mtime_nsec": st.st_mtime_ns % 1_000_000_000,
        "xattrs": xattrs,
    }


def read_xattrs(path: Path) -> dict[bytes, bytes]:
    """All xattrs of `path` itself (symlinks are not followed), names and values as bytes."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {os.fsencode(n): os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def from_directory(path: Path, object_id_of: ObjectIdOf) -> Directory:
    """Build a tree from a directory on disk.

    Regular files of at most INLINE_MAX bytes are read into the tree; `object_id_of(file)` names
    larger ones. Files with the same (st_dev, st_ino) become one leaf object (hardlinks).
    """
    seen: dict[tuple[int, int], Leaf] = {}

    def leaf(p: Path, st: os.stat_result) -> Leaf:
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in seen:
            return seen[key]
        meta = _meta(st, read_xattrs(p))
        fmt = stat.S_IFMT(st.st_mode)
        node: Leaf
        if fmt == stat.S_IFREG:
            if st.st_size <= INLINE_MAX:
                node = Regular(size=st.st_size, data=p.read_bytes(), **meta)
            else:
                node = Regular(size=st.st_size, object_id=object_id_of(p), **meta)
        elif fmt == stat.S_IFLNK:
            node = Symlink(target=os.fsencode(os.readlink(p)), **meta)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            node = Device(rdev=st.st_rdev, **meta)
        elif fmt == stat.S_IFIFO:
            node = Fifo(**meta)
        elif fmt == stat.S_IFSOCK:
            node = Socket(**meta)
        else:
            raise ValueError(f"{p}: unsupported file type {fmt:#o}")
        if st.st_nlink > 1:
            seen[key] = node
        return node

    def directory(p: Path, st: os.stat_result) -> Directory:
        d = Directory(**_meta(st, read_xattrs(p)))
        with os.scandir(p) as it:
            children = sorted(it, key=lambda e: os.fsencode(e.name))
        for entry in children:
            child = Path(entry.path)
            cst = entry.stat(follow_symlinks=False)
            name = os.fsencode(entry.name)
            d.entries[name] = directory(child, cst) if stat.S_ISDIR(cst.st_mode) else leaf(child, cst)
        return d

    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path}: not a directory")
    return directory(path, st)
