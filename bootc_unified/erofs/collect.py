"""Flatten a tree into the writer's inode list, checking everything EROFS and overlayfs need.

Inodes come in depth-first order: a directory, then its children in bytewise name order (a
hardlinked leaf where its first name is met). Each inode gets its source xattrs as (prefix index,
suffix, value), sorted by name with trusted.overlay.X escaped to trusted.overlay.overlay.X, and an
external file (a regular file over INLINE_MAX bytes) the raw fs-verity digest of its object: the
writer stores trusted.overlay.metacopy and .redirect for it (`overlay_xattrs`) before the source
ones.
"""

from __future__ import annotations

import functools
import stat

from bootc_unified.erofs import format as fmt
from bootc_unified.erofs.errors import TreeError
from bootc_unified.erofs.tree import INLINE_MAX, Device, Directory, Fifo, Node, Regular, Socket, Symlink
from bootc_unified.verity import HashAlg

NAME_MAX = 255
SYMLINK_MAX = 4095  # PATH_MAX - 1
XAttr = tuple[int, bytes, bytes]  # prefix index, suffix, value

_EXPECTED_TYPE: dict[type, tuple[int, ...]] = {
    Directory: (stat.S_IFDIR,),
    Regular: (stat.S_IFREG,),
    Symlink: (stat.S_IFLNK,),
    Device: (stat.S_IFCHR, stat.S_IFBLK),
    Fifo: (stat.S_IFIFO,),
    Socket: (stat.S_IFSOCK,),
}


# A directory entry: (name, inode index, file type). Names are unique in a directory, so entries
# sort by name as tuples. Plain tuples: a directory-heavy tree has one per inode, and a NamedTuple
# costs a Python call each to build.
Entry = tuple[bytes, int, int]


class FlatInode:
    """One inode of the image: the node, the first name it was found under (for messages), its
    link count, its source xattrs converted, an external file's object digest and a directory's
    sorted entries (with . and ..). A plain slotted class: one is built per inode."""

    __slots__ = ("digest", "entries", "nlink", "node", "path", "xattrs")

    def __init__(self, node: Node, path: bytes, digest: bytes | None = None) -> None:
        self.node = node
        self.path = path
        self.nlink = 1
        self.xattrs: list[XAttr] = _NO_XATTRS
        self.digest = digest
        self.entries: list[Entry] = _NO_ENTRIES


# Shared by every inode without xattrs / that is not a directory: never appended to (collect
# gives a directory its own list, and convert_xattrs returns a new one).
_NO_XATTRS: list[XAttr] = []
_NO_ENTRIES: list[Entry] = []


def show(path: bytes) -> str:
    return repr(path.decode("utf-8", "backslashreplace"))


def check_name(parent: bytes, name: bytes) -> None:
    if 0 < len(name) <= NAME_MAX and name not in (b".", b"..") and b"/" not in name and b"\0" not in name:
        return
    where = f"in directory {show(parent or b'/')}"
    if not name:
        raise TreeError(f"{where}: empty file name")
    if name in (b".", b".."):
        raise TreeError(f"{where}: {name.decode()!r} is not allowed as a file name")
    if b"/" in name or b"\0" in name:
        raise TreeError(f"{where}: file name {show(name)} contains {'/' if b'/' in name else 'NUL'}")
    if len(name) > NAME_MAX:
        raise TreeError(f"{where}: file name of {len(name)} bytes exceeds {NAME_MAX}: {show(name[:40])}...")


def _split(name: bytes) -> tuple[int, bytes]:
    split = fmt.split_xattr_name(name)
    assert split is not None
    return split


_METACOPY_INDEX, _METACOPY_SUFFIX = _split(fmt.METACOPY)
_REDIRECT_INDEX, _REDIRECT_SUFFIX = _split(fmt.REDIRECT)


@functools.cache
def _metacopy_header(alg: HashAlg) -> bytes:
    """struct ovl_metacopy: version 0, length, flags 0, digest algorithm; the digest follows."""
    return bytes((0, 4 + alg.size, 0, alg.kernel_id))


def object_digest(path: bytes, node: Regular, alg: HashAlg) -> bytes:
    """The raw digest named by an external file's object_id, which must be canonical lowercase hex."""
    oid = node.object_id
    if oid is not None and len(oid) == 2 * alg.size:
        try:  # lowercase hex of the digest's length: what fromhex takes back and hex() gives again
            digest = bytes.fromhex(oid)
        except ValueError:
            pass
        else:
            if len(digest) == alg.size and oid == digest.hex():
                return digest
    raise TreeError(
        f"{show(path)}: regular file of {node.size} bytes needs object_id, "
        f"a lowercase hex {alg.label} fs-verity digest of {2 * alg.size} digits (got {oid!r})"
    )


def overlay_xattrs(digest: bytes, alg: HashAlg) -> list[XAttr]:
    """trusted.overlay.metacopy (with the fs-verity digest) and .redirect (into objects/)."""
    oid = digest.hex()
    return [
        (_METACOPY_INDEX, _METACOPY_SUFFIX, _metacopy_header(alg) + digest),
        (_REDIRECT_INDEX, _REDIRECT_SUFFIX, f"/{oid[:2]}/{oid[2:]}".encode()),
    ]


def convert_xattrs(path: bytes, node: Node) -> list[XAttr]:
    """The node's own xattrs as stored: checked, escaped, sorted by name."""
    if not node.xattrs:
        return []
    out: list[XAttr] = []
    items: list[tuple[bytes, bytes]] = []
    for name in sorted(node.xattrs):
        value = node.xattrs[name]
        if not name or b"\0" in name:
            raise TreeError(f"{show(path)}: xattr name {name!r} is empty or contains NUL")
        if len(name) > fmt.XATTR_NAME_MAX:
            raise TreeError(
                f"{show(path)}: xattr name of {len(name)} bytes exceeds {fmt.XATTR_NAME_MAX}: "
                f"{show(name[:40])}..."
            )
        if len(value) > fmt.XATTR_VALUE_MAX:
            raise TreeError(
                f"{show(path)}: xattr {show(name)} value of {len(value)} bytes exceeds EROFS's "
                f"{fmt.XATTR_VALUE_MAX}-byte limit"
            )
        if name.startswith(fmt.OVERLAY_PREFIX):
            name = fmt.OVERLAY_ESCAPED + name[len(fmt.OVERLAY_PREFIX) :]
        items.append((name, value))
    for name, value in items:
        split = fmt.split_xattr_name(name)
        if split is None:
            raise TreeError(
                f"{show(path)}: xattr {show(name)} has a namespace EROFS cannot store "
                "(only user., trusted., security. and system.posix_acl_*)"
            )
        index, suffix = split
        if len(suffix) > 255:
            raise TreeError(f"{show(path)}: xattr {show(name[:40])}...: escaped name too long for EROFS")
        out.append((index, suffix, value))
    return out


def check_node(path: bytes, node: Node) -> None:
    expected = _EXPECTED_TYPE.get(type(node))
    if expected is None:
        raise TreeError(f"{show(path)}: not a tree node: {type(node).__name__}")
    if node.mode & 0o170000 not in expected or node.mode >> 16:
        raise TreeError(f"{show(path)}: mode {node.mode:#o} does not fit a {type(node).__name__}")
    if not 0 <= node.uid < 1 << 32:
        raise TreeError(f"{show(path)}: uid {node.uid} out of range")
    if not 0 <= node.gid < 1 << 32:
        raise TreeError(f"{show(path)}: gid {node.gid} out of range")
    if not 0 <= node.mtime_nsec < 1_000_000_000:
        raise TreeError(f"{show(path)}: mtime_nsec {node.mtime_nsec} out of range")
    if not -(1 << 63) <= node.mtime < 1 << 63:
        raise TreeError(f"{show(path)}: mtime {node.mtime} out of range")
    if isinstance(node, Regular):
        if node.size < 0:
            raise TreeError(f"{show(path)}: negative size")
        if node.size <= INLINE_MAX and (node.data is None or len(node.data) != node.size):
            raise TreeError(
                f"{show(path)}: regular file of {node.size} bytes needs its content in data "
                f"(got {None if node.data is None else len(node.data)} bytes)"
            )
        if node.size > INLINE_MAX and node.data is not None:
            raise TreeError(f"{show(path)}: content of a {node.size}-byte file goes to objects, not data")
    elif isinstance(node, Symlink):
        if not node.target or b"\0" in node.target or len(node.target) > SYMLINK_MAX:
            raise TreeError(
                f"{show(path)}: symlink target must be 1..{SYMLINK_MAX} bytes without NUL "
                f"(got {len(node.target)} bytes)"
            )
    elif isinstance(node, Device):
        if stat.S_ISCHR(node.mode) and node.rdev == 0:
            raise TreeError(
                f"{show(path)}: character device 0/0 is an overlay whiteout; apply whiteouts before writing"
            )
        if fmt.new_decode_dev(fmt.new_encode_dev(node.rdev)) != node.rdev:
            raise TreeError(f"{show(path)}: device number {node.rdev:#x} does not fit EROFS's 32 bits")


def collect(root: Directory, alg: HashAlg) -> list[FlatInode]:
    """The inode list, root first; hardlinked leaves once, with nlink counting their names."""
    check_node(b"/", root)
    inodes: list[FlatInode] = []
    index_of: dict[int, int] = {}  # id(node) -> inode index
    directories: list[int] = []  # their inode indexes
    # Depth-first with an explicit stack (deep trees don't hit Python's recursion limit);
    # children are pushed in reverse so they are visited in name order. check_node has made sure
    # every node's type is exactly one of the tree's classes, so `type(node) is` tells them apart.
    stack: list[tuple[bytes, Node]] = [(b"", root)]
    while stack:
        path, node = stack.pop()
        seen = index_of.get(id(node))
        if seen is not None:
            if type(node) is Directory:
                raise TreeError(f"{show(path)}: a directory may appear only once in the tree")
            inodes[seen].nlink += 1
            continue
        index_of[id(node)] = len(inodes)
        if type(node) is Regular and node.size > INLINE_MAX:
            flat = FlatInode(node, path, object_digest(path, node, alg))
        else:
            flat = FlatInode(node, path or b"/")
        if node.xattrs:
            flat.xattrs = convert_xattrs(flat.path, node)
        if type(node) is Directory:
            directories.append(len(inodes))
            flat.entries = []
            children = node.entries
            pushed = []
            for name in sorted(children):
                check_name(path, name)
                child = children[name]
                child_path = path + b"/" + name
                check_node(child_path, child)
                pushed.append((child_path, child))
            pushed.reverse()
            stack += pushed
        inodes.append(flat)
    # Second pass: directory entries, now that every node has its index.
    file_types = fmt.FILE_TYPES
    for me in directories:
        inode = inodes[me]
        entries: list[Entry] = [(b".", me, fmt.FT_DIR)]
        subdirs = 0
        for name, child in inode.node.entries.items():  # type: ignore[union-attr]
            index = index_of[id(child)]
            if type(child) is Directory:
                subdirs += 1
                inodes[index].entries.append((b"..", me, fmt.FT_DIR))
            entries.append((name, index, file_types[child.mode & 0o170000]))
        if me == 0:
            entries.append((b"..", 0, fmt.FT_DIR))  # the root is its own parent
        entries += inode.entries
        entries.sort()
        inode.entries = entries
        inode.nlink = 2 + subdirs
    return inodes
