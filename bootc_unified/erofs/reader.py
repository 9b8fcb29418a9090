"""Read a composefs EROFS image back into the tree model (for GC, fsck and tests).

`read_image(data)` walks the whole image from the root and checks it as it goes: every offset
in bounds, directories sorted with correct `.`/`..`, dirent types matching inodes, leaf nlink
matching the names found, external files carrying a well-formed metacopy digest and a redirect
to the matching objects/ path. Anything else raises ImageError naming the path and the fault.
"""

from __future__ import annotations

import itertools
import stat
from dataclasses import dataclass

from bootc_unified.erofs import format as fmt
from bootc_unified.erofs.errors import ImageError
from bootc_unified.erofs.tree import (
    INLINE_MAX,
    Device,
    Directory,
    Fifo,
    InodeMeta,
    Node,
    Regular,
    Socket,
    Symlink,
    walk,
)
from bootc_unified.verity import HashAlg

_KNOWN_LAYOUTS = (fmt.LAYOUT_FLAT_PLAIN, fmt.LAYOUT_FLAT_INLINE, fmt.LAYOUT_CHUNK_BASED)


@dataclass
class RawInode:
    nid: int
    mode: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    nlink: int
    size: int
    layout: int
    i_u: int
    xattrs: dict[bytes, bytes]
    data_offset: int  # where inline data (the tail, or chunk entries) starts


def _show(path: bytes) -> str:
    return repr((path or b"/").decode("utf-8", "backslashreplace"))


class Image:
    """A parsed superblock plus accessors for inodes, xattrs and data."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        if len(data) < fmt.INODES_START:
            raise ImageError(f"image of {len(data)} bytes is too short for a composefs header and superblock")
        magic, version, _flags, _layout = fmt.COMPOSEFS_HEADER.unpack_from(data, 0)
        if magic != fmt.COMPOSEFS_MAGIC:
            raise ImageError(f"bad composefs header magic {magic:#x} (want {fmt.COMPOSEFS_MAGIC:#x})")
        if version != fmt.COMPOSEFS_VERSION:
            raise ImageError(f"unsupported composefs header version {version}")
        sb = fmt.SUPERBLOCK.unpack_from(data, fmt.SUPERBLOCK_OFFSET)
        (magic, _csum, self.feature_compat, blkszbits, extslots, self.root_nid, self.inos) = sb[:7]
        (self.build_time, self.build_time_nsec, self.blocks, meta_blkaddr, xattr_blkaddr) = sb[7:12]
        self.feature_incompat = sb[14]
        if magic != fmt.EROFS_MAGIC:
            raise ImageError(f"bad EROFS superblock magic {magic:#x} (want {fmt.EROFS_MAGIC:#x})")
        if blkszbits != fmt.BLOCK_BITS:
            raise ImageError(f"unsupported EROFS block size 2^{blkszbits} (only 4096)")
        if self.feature_incompat & ~fmt.FEATURE_INCOMPAT_CHUNKED_FILE:
            raise ImageError(f"unsupported EROFS incompatible features {self.feature_incompat:#x}")
        if extslots:
            raise ImageError("unsupported EROFS superblock extension slots")
        if self.blocks * fmt.BLOCK_SIZE > len(data):
            raise ImageError(f"superblock claims {self.blocks} blocks but the image has {len(data)} bytes")
        if self.build_time >= 1 << 63:
            self.build_time -= 1 << 64
        self.meta_base = meta_blkaddr * fmt.BLOCK_SIZE
        self.xattr_base = xattr_blkaddr * fmt.BLOCK_SIZE

    def _slice(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > len(self.data):
            raise ImageError(
                f"{what}: {size} bytes at offset {offset} lie outside the image ({len(self.data)})"
            )
        return bytes(self.data[offset : offset + size])

    def _xattr_entry(self, offset: int, what: str) -> tuple[bytes, bytes, int]:
        name_len, index, value_size = fmt.XATTR_ENTRY.unpack(self._slice(offset, 4, what))
        body = self._slice(offset + 4, name_len + value_size, what)
        prefix = fmt.XATTR_PREFIXES.get(index)
        if prefix is None:
            raise ImageError(f"{what}: xattr with unknown prefix index {index}")
        return (
            prefix + body[:name_len],
            body[name_len:],
            fmt.xattr_entry_size(body[:name_len], body[name_len:]),
        )

    def inode(self, nid: int, path: bytes) -> RawInode:
        what = f"inode {nid} ({_show(path)})"
        offset = self.meta_base + nid * fmt.NID_ALIGN
        head = self._slice(offset, fmt.INODE_COMPACT.size, what)
        i_format = int.from_bytes(head[:2], "little")
        if i_format & ~0xF:
            raise ImageError(f"{what}: unsupported inode format bits {i_format:#x}")
        layout = (i_format >> 1) & 0x7
        if layout not in _KNOWN_LAYOUTS:
            raise ImageError(f"{what}: unsupported data layout {layout}")
        if i_format & 1:
            (_, icount, mode, _, size, i_u, _ino, uid, gid, mtime, nsec, nlink) = fmt.INODE_EXTENDED.unpack(
                self._slice(offset, fmt.INODE_EXTENDED.size, what)
            )
            if mtime >= 1 << 63:
                mtime -= 1 << 64
            isize = fmt.INODE_EXTENDED.size
        else:
            (_, icount, mode, nlink, size, _, i_u, _ino, uid, gid, _) = fmt.INODE_COMPACT.unpack(head)
            mtime, nsec = self.build_time, self.build_time_nsec
            isize = fmt.INODE_COMPACT.size
        if stat.S_IFMT(mode) not in fmt.FILE_TYPES:
            raise ImageError(f"{what}: mode {mode:#o} has no valid file type")
        xattrs: dict[bytes, bytes] = {}
        xsize = 0
        if icount:
            xsize = fmt.XATTR_IBODY_HEADER.size + (icount - 1) * 4
            start = offset + isize
            _filter, shared_count = fmt.XATTR_IBODY_HEADER.unpack(
                self._slice(start, fmt.XATTR_IBODY_HEADER.size, what)
            )
            pos = start + fmt.XATTR_IBODY_HEADER.size
            end = start + xsize
            if pos + 4 * shared_count > end:
                raise ImageError(f"{what}: {shared_count} shared xattrs do not fit the xattr area")
            for _ in range(shared_count):
                xid = int.from_bytes(self._slice(pos, 4, what), "little")
                name, value, _ = self._xattr_entry(self.xattr_base + 4 * xid, f"{what} shared xattr {xid}")
                xattrs[name] = value
                pos += 4
            while pos < end:
                name, value, used = self._xattr_entry(pos, what)
                if pos + used > end:
                    raise ImageError(f"{what}: xattr {name!r} runs past the inode's xattr area")
                xattrs[name] = value
                pos += used
        return RawInode(
            nid, mode, uid, gid, mtime, nsec, nlink, size, layout, i_u, xattrs, offset + isize + xsize
        )

    def content(self, raw: RawInode, path: bytes) -> bytes:
        """The data of a FLAT_PLAIN / FLAT_INLINE inode."""
        what = f"inode {raw.nid} ({_show(path)})"
        if raw.layout == fmt.LAYOUT_FLAT_PLAIN:
            return self._slice(raw.i_u * fmt.BLOCK_SIZE, raw.size, what) if raw.size else b""
        if raw.layout == fmt.LAYOUT_FLAT_INLINE:
            full = raw.size // fmt.BLOCK_SIZE * fmt.BLOCK_SIZE
            tail = raw.size - full
            if raw.data_offset % fmt.BLOCK_SIZE + tail > fmt.BLOCK_SIZE:
                raise ImageError(f"{what}: inline data crosses a block boundary")
            head = self._slice(raw.i_u * fmt.BLOCK_SIZE, full, what) if full else b""
            return head + self._slice(raw.data_offset, tail, what)
        raise ImageError(f"{what}: data layout {raw.layout} where flat data was expected")

    def check_null_chunks(self, raw: RawInode, path: bytes) -> None:
        what = f"inode {raw.nid} ({_show(path)})"
        if raw.i_u & ~fmt.CHUNK_FORMAT_BLKBITS_MASK:
            raise ImageError(f"{what}: unsupported chunk format {raw.i_u:#x}")
        chunk_size = fmt.BLOCK_SIZE << (raw.i_u & fmt.CHUNK_FORMAT_BLKBITS_MASK)
        count = -(-raw.size // chunk_size)
        entries = self._slice(raw.data_offset, fmt.CHUNK_ENTRY * count, what)
        if entries != b"\xff" * len(entries):
            raise ImageError(f"{what}: chunk-based file with data in the image (composefs keeps none)")


def parse_metacopy(value: bytes, what: str) -> tuple[HashAlg, str]:
    if len(value) < 4 or value[0] != 0 or value[1] != len(value) or value[2] != 0:
        raise ImageError(f"{what}: malformed trusted.overlay.metacopy {value.hex()}")
    try:
        alg = HashAlg.from_kernel_id(value[3])
    except ValueError as e:
        raise ImageError(f"{what}: metacopy {e}") from e
    digest = value[4:]
    if len(digest) != alg.size:
        raise ImageError(f"{what}: metacopy digest of {len(digest)} bytes for {alg.label}")
    return alg, digest.hex()


def _source_xattrs(raw: RawInode) -> dict[bytes, bytes]:
    out = {}
    for name, value in sorted(raw.xattrs.items()):
        if name.startswith(fmt.OVERLAY_ESCAPED):
            name = fmt.OVERLAY_PREFIX + name[len(fmt.OVERLAY_ESCAPED) :]
        out[name] = value
    return out


def _common(raw: RawInode) -> InodeMeta:
    return {
        "mode": raw.mode,
        "uid": raw.uid,
        "gid": raw.gid,
        "mtime": raw.mtime,
        "mtime_nsec": raw.mtime_nsec,
        "xattrs": _source_xattrs(raw),
    }


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.image = Image(data)
        self.leaves: dict[int, tuple[Node, bytes]] = {}  # nid -> node, first path
        self.names: dict[int, int] = {}  # nid -> names found
        self.nlink: dict[int, int] = {}
        self.dirs: set[int] = set()
        self.alg: HashAlg | None = None

    def leaf(self, raw: RawInode, path: bytes) -> Node:
        what = f"{_show(path)}"
        fmt_bits = stat.S_IFMT(raw.mode)
        common = _common(raw)
        xattrs = common["xattrs"]
        if fmt_bits == stat.S_IFREG:
            if raw.layout == fmt.LAYOUT_CHUNK_BASED:
                metacopy = raw.xattrs.get(fmt.METACOPY)
                redirect = raw.xattrs.get(fmt.REDIRECT)
                if metacopy is None or redirect is None:
                    raise ImageError(f"{what}: external file without metacopy and redirect xattrs")
                alg, oid = parse_metacopy(metacopy, what)
                if self.alg is not None and alg is not self.alg:
                    raise ImageError(f"{what}: {alg.label} digest in an image of {self.alg.label} digests")
                self.alg = alg
                if redirect != f"/{oid[:2]}/{oid[2:]}".encode():
                    raise ImageError(
                        f"{what}: redirect {redirect!r} does not match the metacopy digest {oid}"
                    )
                if raw.size <= INLINE_MAX:
                    raise ImageError(f"{what}: external file of only {raw.size} bytes")
                self.image.check_null_chunks(raw, path)
                del xattrs[fmt.METACOPY], xattrs[fmt.REDIRECT]
                return Regular(size=raw.size, object_id=oid, **common)
            if raw.size > INLINE_MAX:
                raise ImageError(f"{what}: regular file of {raw.size} bytes stored in the image")
            data = self.image.content(raw, path)
            return Regular(size=raw.size, data=data, **common)
        if fmt_bits == stat.S_IFLNK:
            target = self.image.content(raw, path)
            if not target or b"\0" in target:
                raise ImageError(f"{what}: bad symlink target {target!r}")
            return Symlink(target=target, **common)
        if fmt_bits in (stat.S_IFCHR, stat.S_IFBLK):
            return Device(rdev=fmt.new_decode_dev(raw.i_u), **common)
        if fmt_bits == stat.S_IFIFO:
            return Fifo(**common)
        return Socket(**common)

    def entries(self, raw: RawInode, path: bytes) -> list[tuple[bytes, int, int]]:
        what = f"directory {_show(path)} (inode {raw.nid})"
        data = self.image.content(raw, path)
        out: list[tuple[bytes, int, int]] = []
        for start in range(0, len(data), fmt.BLOCK_SIZE):
            block = data[start : start + fmt.BLOCK_SIZE]
            first = fmt.DIRENT.unpack_from(block, 0) if len(block) >= fmt.DIRENT.size else None
            if (
                first is None
                or first[1] < fmt.DIRENT.size
                or first[1] % fmt.DIRENT.size
                or first[1] >= len(block)
            ):
                raise ImageError(f"{what}: malformed directory block at {start}")
            count = first[1] // fmt.DIRENT.size
            dirents = [fmt.DIRENT.unpack_from(block, i * fmt.DIRENT.size) for i in range(count)]
            for i, (nid, nameoff, ftype) in enumerate(dirents):
                end = dirents[i + 1][1] if i + 1 < count else len(block)
                if not nameoff <= end <= len(block) or nameoff < first[1]:
                    raise ImageError(f"{what}: bad name offsets in block at {start}")
                name = block[nameoff:end]
                if i + 1 == count:
                    name = name.split(b"\0", 1)[0]
                if not name:
                    raise ImageError(f"{what}: empty name in block at {start}")
                out.append((name, nid, ftype))
        names = [e[0] for e in out]
        if any(a >= b for a, b in itertools.pairwise(names)):
            raise ImageError(f"{what}: entries not in strictly increasing bytewise order")
        return out

    def read(self) -> Directory:
        image = self.image
        root_raw = image.inode(image.root_nid, b"/")
        if not stat.S_ISDIR(root_raw.mode):
            raise ImageError("root inode is not a directory")
        root = self.directory(root_raw)
        stack: list[tuple[bytes, RawInode, Directory, int]] = [(b"", root_raw, root, image.root_nid)]
        self.dirs.add(image.root_nid)
        while stack:
            path, raw, node, parent = stack.pop()
            subdirs = 0
            seen_dot = seen_dotdot = False
            for name, nid, ftype in self.entries(raw, path):
                if name == b".":
                    seen_dot = nid == raw.nid
                    continue
                if name == b"..":
                    seen_dotdot = nid == parent
                    continue
                if b"/" in name:
                    raise ImageError(f"directory {_show(path)}: name {name!r} contains '/'")
                child_path = path + b"/" + name
                if nid in self.leaves:
                    child, _ = self.leaves[nid]
                    self.names[nid] += 1
                    if fmt.FILE_TYPES[stat.S_IFMT(child.mode)] != ftype:
                        raise ImageError(f"{_show(child_path)}: dirent type {ftype} does not match the inode")
                    node.entries[name] = child
                    continue
                if nid in self.dirs:
                    raise ImageError(
                        f"{_show(child_path)}: directory inode {nid} reached twice (cycle or link)"
                    )
                child_raw = image.inode(nid, child_path)
                if fmt.FILE_TYPES[stat.S_IFMT(child_raw.mode)] != ftype:
                    raise ImageError(f"{_show(child_path)}: dirent type {ftype} does not match the inode")
                if stat.S_ISDIR(child_raw.mode):
                    self.dirs.add(nid)
                    subdirs += 1
                    child_dir = self.directory(child_raw)
                    node.entries[name] = child_dir
                    stack.append((child_path, child_raw, child_dir, raw.nid))
                else:
                    leaf = self.leaf(child_raw, child_path)
                    self.leaves[nid] = (leaf, child_path)
                    self.names[nid] = 1
                    self.nlink[nid] = child_raw.nlink
                    node.entries[name] = leaf
            if not (seen_dot and seen_dotdot):
                raise ImageError(f"directory {_show(path)}: missing or wrong '.' or '..' entry")
            if raw.nlink != 2 + subdirs:
                raise ImageError(f"directory {_show(path)}: nlink {raw.nlink}, expected {2 + subdirs}")
        for nid, count in self.names.items():
            if self.nlink[nid] != count:
                path = self.leaves[nid][1]
                raise ImageError(f"{_show(path)}: nlink {self.nlink[nid]} but {count} names in the image")
        return root

    def directory(self, raw: RawInode) -> Directory:
        return Directory(**_common(raw))


def read_image(data: bytes) -> Directory:
    """The tree of a composefs EROFS image; raises ImageError if it is malformed."""
    return _Reader(data).read()


def referenced_objects(data: bytes) -> set[str]:
    """Hex object IDs of every external file in the image (what GC must keep)."""
    root = read_image(data)
    return {n.object_id for _, n in walk(root) if isinstance(n, Regular) and n.object_id is not None}
