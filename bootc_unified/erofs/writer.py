"""Write a composefs EROFS image from a tree.

Two steps: plan (inode formats, data layouts, offsets, shared xattrs, data blocks) and emit
(pack the structures into one preallocated buffer). The same tree always gives the same bytes.

Decisions:
- compact 32-byte inodes when they can say everything: uid/gid/nlink < 2^16, size < 2^32 and the
  mtime equal to the superblock's build time, which is the most common mtime of the tree (the
  kernel gives compact inodes the build time); extended 64-byte inodes otherwise.
- an (name, value) xattr pair used by more than one inode goes into the shared xattr table.
- data that fits ("tail" of at most 2 KiB, with its inode in one 4 KiB block) is stored inline
  after the inode (FLAT_INLINE); otherwise in whole blocks after the metadata (FLAT_PLAIN).
- regular files over 64 bytes: CHUNK_BASED with null chunks (the data is the object named by the
  redirect xattr); one chunk covers the file whenever the chunk format allows.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from bootc_unified.erofs import format as fmt
from bootc_unified.erofs.collect import Entry, FlatInode, collect, overlay_xattrs, show
from bootc_unified.erofs.errors import TreeError
from bootc_unified.erofs.tree import Device, Directory, Regular, Symlink
from bootc_unified.verity import HashAlg

INLINE_TAIL_MAX = fmt.BLOCK_SIZE // 2
MAX_CHUNK_FORMAT = 31
_NULL_CHUNK = b"\xff" * fmt.CHUNK_ENTRY  # one chunk entry: a hole (the data is the object)
_NO_SHARED: list[int] = []  # never appended to


@dataclass(slots=True)
class Plan:
    """Where and how one inode is written."""

    extended: bool
    layout: int
    size: int  # i_size
    content_size: int  # bytes of data (directory entries, symlink target, inline file content)
    inline: int  # bytes of data stored after the inode (the tail, or chunk entries)
    blocks: int  # whole blocks in the data area
    shared: list[int]  # indexes into the shared xattr table
    local: bytes  # the local xattr entries, packed
    xattr_size: int
    name_filter: int
    chunk_format: int = 0
    offset: int = 0
    start_block: int = 0
    dir_blocks: Sequence[list[Entry]] = ()  # directories: entries per block
    # Everything after the inode core, when the plan already knows it: an external file's xattr
    # area and null chunk entries (None: write_inode assembles it).
    body: bytes | None = None

    @property
    def meta_size(self) -> int:
        return (fmt.INODE_EXTENDED.size if self.extended else fmt.INODE_COMPACT.size) + self.xattr_size


def directory_blocks(entries: list[Entry]) -> list[list[Entry]]:
    """Split sorted entries into 4 KiB blocks of dirents + names."""
    blocks: list[list[Entry]] = [[]]
    used = 0
    for entry in entries:
        need = fmt.DIRENT.size + len(entry[0])
        if used + need > fmt.BLOCK_SIZE:
            blocks.append([])
            used = 0
        blocks[-1].append(entry)
        used += need
    return blocks


def directory_size(blocks: Sequence[list[Entry]]) -> int:
    last = sum(fmt.DIRENT.size + len(e[0]) for e in blocks[-1])
    return (len(blocks) - 1) * fmt.BLOCK_SIZE + last


def chunk_format(size: int) -> tuple[int, int]:
    """(chunk format, number of chunks): the smallest chunk size covering the file in one chunk."""
    bits = max(fmt.BLOCK_BITS, (size - 1).bit_length())
    chunk_format = min(bits - fmt.BLOCK_BITS, MAX_CHUNK_FORMAT)
    chunk_size = fmt.BLOCK_SIZE << chunk_format
    return chunk_format, -(-size // chunk_size)


class XattrPlanner:
    """Lays out each inode's xattrs: pairs that more than one inode has go to the shared table.

    An external file's metacopy and redirect xattrs come first, then its own. Files that share an
    object share those two; an external file with no xattrs of its own and an object of its own
    (the usual case) takes the fast path: its packed entries are the digest and object path set
    into fixed bytes.
    """

    def __init__(self, inodes: list[FlatInode], alg: HashAlg) -> None:
        self.alg = alg
        counts = Counter(x for inode in inodes if inode.xattrs for x in set(inode.xattrs))
        objects = Counter(inode.digest for inode in inodes if inode.digest is not None)
        self.shared_objects = {digest for digest, n in objects.items() if n > 1}
        for digest in self.shared_objects:
            for x in overlay_xattrs(digest, alg):
                counts[x] += objects[digest]
        self.table = sorted(x for x, n in counts.items() if n > 1)
        self.index = {x: i for i, x in enumerate(self.table)}
        self.own = _overlay_entries(alg)

    def plan(self, inode: FlatInode) -> tuple[list[int], bytes, int, int]:
        """(shared indexes, packed local xattrs, xattr area size, name filter) of one inode."""
        digest = inode.digest
        xattrs = inode.xattrs if digest is None else [*overlay_xattrs(digest, self.alg), *inode.xattrs]
        if not xattrs:
            return [], b"", 0, 0
        shared: list[int] = []
        local: list[bytes] = []
        bits = 0
        for x in xattrs:
            bits |= fmt.filter_bit(x[0], x[1])
            index = self.index.get(x)
            if index is not None and len(shared) < fmt.SHARED_MAX:
                shared.append(index)
            else:
                local.append(xattr_entry(*x))
        packed = b"".join(local)
        size = fmt.XATTR_IBODY_HEADER.size + 4 * len(shared) + len(packed)
        if (size - fmt.XATTR_IBODY_HEADER.size) // 4 + 1 > fmt.XATTR_ICOUNT_MAX:
            raise TreeError(
                f"{show(inode.path)}: xattrs need {size} bytes, more than an EROFS inode holds "
                f"({fmt.XATTR_IBODY_HEADER.size + 4 * (fmt.XATTR_ICOUNT_MAX - 1)})"
            )
        return shared, packed, size, ~bits & 0xFFFFFFFF

    def own_object_area(self, inode: FlatInode) -> bytes | None:
        """The whole xattr area (ibody header, metacopy and redirect entries) of an external file
        with no xattrs of its own and an object of its own (the usual case: its digest and
        object path set into fixed bytes), else None."""
        digest = inode.digest
        if digest is None or inode.xattrs or digest in self.shared_objects:
            return None
        own = self.own
        oid = digest.hex().encode()
        return b"".join((own.metacopy_head, digest, own.between, oid[:2], b"/", oid[2:], own.tail))


def xattr_entry(index: int, suffix: bytes, value: bytes) -> bytes:
    """One xattr entry as stored (inline or in the shared table), padded to 4 bytes."""
    raw = fmt.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
    return raw + bytes(-len(raw) % 4)


@dataclass(frozen=True, slots=True)
class OverlayEntries:
    """The packed metacopy + redirect entries of an external file, around its digest and object
    path: metacopy_head + digest + between + "XX" + "/" + rest of the hex digest + tail."""

    metacopy_head: bytes  # the xattr ibody header (no shared xattrs) comes first
    between: bytes
    tail: bytes
    size: int  # the xattr area: ibody header + both entries
    name_filter: int


@functools.cache
def _overlay_entries(alg: HashAlg) -> OverlayEntries:
    digest = bytes(alg.size)
    (mi, ms, mv), (ri, rs, rv) = overlay_xattrs(digest, alg)
    metacopy, redirect = xattr_entry(mi, ms, mv), xattr_entry(ri, rs, rv)
    m_end = fmt.XATTR_ENTRY.size + len(ms) + len(mv)  # where the digest ends
    r_start = fmt.XATTR_ENTRY.size + len(rs) + 1  # after the redirect's leading "/"
    r_end = fmt.XATTR_ENTRY.size + len(rs) + len(rv)
    name_filter = ~(fmt.filter_bit(mi, ms) | fmt.filter_bit(ri, rs)) & 0xFFFFFFFF
    header = fmt.XATTR_IBODY_HEADER.pack(name_filter, 0)
    entries = OverlayEntries(
        header + metacopy[: m_end - alg.size],
        metacopy[m_end:] + redirect[:r_start],
        redirect[r_end:],
        fmt.XATTR_IBODY_HEADER.size + len(metacopy) + len(redirect),
        name_filter,
    )
    spliced = entries.metacopy_head + digest + entries.between + rv[1:] + entries.tail
    assert spliced == header + metacopy + redirect
    return entries


def needs_extended(inode: FlatInode, size: int, build_time: tuple[int, int]) -> bool:
    """Whether a compact inode cannot say everything (see the module's decisions)."""
    node = inode.node
    return not (
        node.uid <= 0xFFFF
        and node.gid <= 0xFFFF
        and inode.nlink <= 0xFFFF
        and size <= 0xFFFFFFFF
        and node.mtime == build_time[0]
        and node.mtime_nsec == build_time[1]
    )


def plan_inode(inode: FlatInode, xattrs: XattrPlanner, build_time: tuple[int, int]) -> Plan:
    node = inode.node
    if inode.digest is not None:  # an external file: null chunks, its data is the object
        size = node.size  # type: ignore[union-attr]
        chunked, chunks = (0, 1) if size <= fmt.BLOCK_SIZE else chunk_format(size)
        extended = needs_extended(inode, size, build_time)
        inline = fmt.CHUNK_ENTRY * chunks
        layout = fmt.LAYOUT_CHUNK_BASED
        area = xattrs.own_object_area(inode)
        if area is not None:
            own = xattrs.own
            plan = Plan(
                extended, layout, size, 0, inline, 0, _NO_SHARED, b"", own.size, own.name_filter, chunked
            )
            plan.body = area + (_NULL_CHUNK if chunks == 1 else b"\xff" * inline)
            return plan
        shared, local, xattr_size, name_filter = xattrs.plan(inode)
        return Plan(extended, layout, size, 0, inline, 0, shared, local, xattr_size, name_filter, chunked)
    shared, local, xattr_size, name_filter = xattrs.plan(inode)
    blocks: list[list[Entry]] = []
    if isinstance(node, Directory):
        blocks = directory_blocks(inode.entries)
        content = directory_size(blocks)
        size = content
    elif isinstance(node, Regular):  # inline: INLINE_MAX bytes at most
        size = content = node.size
    elif isinstance(node, Symlink):
        size = content = len(node.target)
    else:
        size = content = 0
    extended = needs_extended(inode, size, build_time)
    plan = Plan(extended, fmt.LAYOUT_FLAT_PLAIN, size, content, 0, 0, shared, local, xattr_size, name_filter)
    plan.dir_blocks = blocks
    tail = content % fmt.BLOCK_SIZE
    if tail and tail <= INLINE_TAIL_MAX and plan.meta_size + tail <= fmt.BLOCK_SIZE:
        plan.layout = fmt.LAYOUT_FLAT_INLINE
        plan.inline = tail
        plan.blocks = content // fmt.BLOCK_SIZE
    else:
        plan.blocks = -(-content // fmt.BLOCK_SIZE)
    return plan


def place(plans: list[Plan]) -> int:
    """Give every inode its offset; returns the end of the inode area."""
    cursor = fmt.INODES_START
    for plan in plans:
        record = plan.meta_size + plan.inline
        in_block = cursor % fmt.BLOCK_SIZE
        if in_block and (record > fmt.BLOCK_SIZE or in_block + record > fmt.BLOCK_SIZE):
            cursor = fmt.align(cursor, fmt.BLOCK_SIZE)
        plan.offset = cursor
        cursor = fmt.align(cursor + record, fmt.NID_ALIGN)
    return cursor


def most_common_mtime(inodes: list[FlatInode]) -> tuple[int, int]:
    counts = Counter((i.node.mtime, i.node.mtime_nsec) for i in inodes)
    best = max(counts.values())
    return min(t for t, n in counts.items() if n == best)


def write_image(root: Directory, alg: HashAlg) -> bytes:
    """The composefs EROFS image of `root`; regular files over 64 bytes refer to objects by digest."""
    inodes = collect(root, alg)
    xattrs = XattrPlanner(inodes, alg)
    table = xattrs.table
    build_time = most_common_mtime(inodes)
    plans = [plan_inode(inode, xattrs, build_time) for inode in inodes]
    inodes_end = place(plans)
    if plans[0].offset // fmt.NID_ALIGN > 0xFFFF:
        raise TreeError("root inode does not fit the superblock's 16-bit root_nid")
    table_offsets = []
    cursor = inodes_end
    for _, suffix, value in table:
        table_offsets.append(cursor)
        cursor += fmt.xattr_entry_size(suffix, value)
    block = fmt.align(cursor, fmt.BLOCK_SIZE) // fmt.BLOCK_SIZE
    for plan in plans:
        if plan.blocks:
            plan.start_block = block
            block += plan.blocks
    total = block * fmt.BLOCK_SIZE
    if block > 0xFFFFFFFF:
        raise TreeError("image too large for 32-bit block addresses")

    out = bytearray(total)
    header = (fmt.COMPOSEFS_MAGIC, fmt.COMPOSEFS_VERSION, 0, fmt.COMPOSEFS_LAYOUT_VERSION)
    fmt.COMPOSEFS_HEADER.pack_into(out, 0, *header)
    chunked = any(p.layout == fmt.LAYOUT_CHUNK_BASED for p in plans)
    fmt.SUPERBLOCK.pack_into(
        out,
        fmt.SUPERBLOCK_OFFSET,
        fmt.EROFS_MAGIC,
        0,
        fmt.FEATURE_COMPAT_MTIME | fmt.FEATURE_COMPAT_XATTR_FILTER,
        fmt.BLOCK_BITS,
        0,
        plans[0].offset // fmt.NID_ALIGN,
        len(inodes),
        build_time[0] & 0xFFFFFFFFFFFFFFFF,
        build_time[1],
        block,
        0,
        0,
        b"",
        b"",
        fmt.FEATURE_INCOMPAT_CHUNKED_FILE if chunked else 0,
    )
    shared_ids = [offset // 4 for offset in table_offsets]
    for (index, suffix, value), offset in zip(table, table_offsets, strict=True):
        entry = xattr_entry(index, suffix, value)
        out[offset : offset + len(entry)] = entry
    for number, (inode, plan) in enumerate(zip(inodes, plans, strict=True)):
        write_inode(out, number, inode, plan, plans, shared_ids)
    return bytes(out)


def i_u(inode: FlatInode, plan: Plan) -> int:
    node = inode.node
    if isinstance(node, Device):
        return fmt.new_encode_dev(node.rdev)
    if plan.layout == fmt.LAYOUT_CHUNK_BASED:
        return plan.chunk_format
    return plan.start_block if plan.blocks else 0


def content_of(inode: FlatInode, plan: Plan, plans: list[Plan]) -> bytes:
    node = inode.node
    if isinstance(node, Directory):
        return directory_content(plan.dir_blocks, plans)
    if isinstance(node, Regular):
        return node.data or b""
    if isinstance(node, Symlink):
        return node.target
    return b""


def directory_content(blocks: Sequence[list[Entry]], plans: list[Plan]) -> bytes:
    parts = []
    for i, block in enumerate(blocks):
        nameoff = fmt.DIRENT.size * len(block)
        dirents = bytearray()
        for name, index, file_type in block:
            dirents += fmt.DIRENT.pack(plans[index].offset // fmt.NID_ALIGN, nameoff, file_type)
            nameoff += len(name)
        data = bytes(dirents) + b"".join(e[0] for e in block)
        parts.append(data.ljust(fmt.BLOCK_SIZE, b"\0") if i < len(blocks) - 1 else data)
    return b"".join(parts)


def write_inode(
    out: bytearray,
    number: int,
    inode: FlatInode,
    plan: Plan,
    plans: list[Plan],
    shared_ids: list[int],
) -> None:
    node = inode.node
    icount = 0 if not plan.xattr_size else (plan.xattr_size - fmt.XATTR_IBODY_HEADER.size) // 4 + 1
    mode = node.mode
    offset = plan.offset
    if plan.extended:
        fmt.INODE_EXTENDED.pack_into(
            out,
            offset,
            1 | plan.layout << 1,
            icount,
            mode,
            0,
            plan.size,
            i_u(inode, plan),
            number + 1,
            node.uid,
            node.gid,
            node.mtime & 0xFFFFFFFFFFFFFFFF,
            node.mtime_nsec,
            inode.nlink,
        )
        offset += fmt.INODE_EXTENDED.size
    else:
        fmt.INODE_COMPACT.pack_into(
            out,
            offset,
            plan.layout << 1,
            icount,
            mode,
            inode.nlink,
            plan.size,
            0,
            i_u(inode, plan),
            number + 1,
            node.uid,
            node.gid,
            0,
        )
        offset += fmt.INODE_COMPACT.size
    body = plan.body
    if body is not None:
        out[offset : offset + len(body)] = body
        return
    if plan.xattr_size:
        fmt.XATTR_IBODY_HEADER.pack_into(out, offset, plan.name_filter, len(plan.shared))
        offset += fmt.XATTR_IBODY_HEADER.size
        for index in plan.shared:
            out[offset : offset + 4] = shared_ids[index].to_bytes(4, "little")
            offset += 4
        out[offset : offset + len(plan.local)] = plan.local
        offset += len(plan.local)
    if plan.layout == fmt.LAYOUT_CHUNK_BASED:
        out[offset : offset + plan.inline] = b"\xff" * plan.inline
        return
    if not plan.content_size:
        return
    content = content_of(inode, plan, plans)
    assert len(content) == plan.content_size, (show(inode.path), len(content), plan.content_size)
    full = plan.blocks * fmt.BLOCK_SIZE if plan.layout == fmt.LAYOUT_FLAT_INLINE else len(content)
    start = plan.start_block * fmt.BLOCK_SIZE
    out[start : start + full] = content[:full]
    if plan.inline:
        out[offset : offset + plan.inline] = content[full:]
