"""On-disk constants and structures of composefs EROFS images (all little-endian).

Layout of what we write: composefs header @0, EROFS superblock @1024, inodes from 1152 (nid =
offset / 32, meta_blkaddr 0), the shared xattr table (id = offset / 4, xattr_blkaddr 0), then
4 KiB-aligned data blocks (directories, long symlinks).
"""

from __future__ import annotations

import os
import stat
import struct
from functools import lru_cache

from bootc_unified.erofs.xxh32 import xxh32

BLOCK_BITS = 12
BLOCK_SIZE = 1 << BLOCK_BITS

COMPOSEFS_MAGIC = 0xD078629A
COMPOSEFS_VERSION = 1  # header format version
COMPOSEFS_LAYOUT_VERSION = 1  # the "composefs_version" field
COMPOSEFS_HEADER = struct.Struct("<IIII16x")  # magic, version, flags, composefs_version, unused[4]

SUPERBLOCK_OFFSET = 1024
EROFS_MAGIC = 0xE0F5E1E2
FEATURE_COMPAT_SB_CHKSUM = 0x1
FEATURE_COMPAT_MTIME = 0x2
FEATURE_COMPAT_XATTR_FILTER = 0x4
FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
# magic, checksum, feature_compat, blkszbits, sb_extslots, root_nid, inos, build_time,
# build_time_nsec, blocks, meta_blkaddr, xattr_blkaddr, uuid, volume_name, feature_incompat,
# then 44 bytes we leave zero (compression, devices, dirblkbits, long xattr prefixes, packed nid...)
SUPERBLOCK = struct.Struct("<IIIBBHQQIIII16s16sI44x")
INODES_START = SUPERBLOCK_OFFSET + SUPERBLOCK.size  # 1152: nid 36

NID_ALIGN = 32
NULL_ADDR = 0xFFFFFFFF

# Inode formats: bit 0 version (0 compact, 1 extended), bits 1-3 data layout.
LAYOUT_FLAT_PLAIN = 0
LAYOUT_FLAT_INLINE = 2
LAYOUT_CHUNK_BASED = 4
# format, xattr_icount, mode, nlink, size u32, mtime (relative to build_time: we write 0), i_u, ino, uid, gid
INODE_COMPACT = struct.Struct("<HHHHIIIIHHI")
# format, xattr_icount, mode, reserved, size u64, i_u, ino, uid, gid, mtime, mtime_nsec, nlink
INODE_EXTENDED = struct.Struct("<HHHHQIIIIQII16x")
CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
CHUNK_ENTRY = 4  # block map entries (no chunk indexes): u32 block address, NULL_ADDR = hole

DIRENT = struct.Struct("<QHBx")  # nid, nameoff, file_type
FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_LNK = 1, 2, 3, 4, 5, 6, 7
FILE_TYPES = {
    stat.S_IFREG: FT_REG,
    stat.S_IFDIR: FT_DIR,
    stat.S_IFCHR: FT_CHR,
    stat.S_IFBLK: FT_BLK,
    stat.S_IFIFO: FT_FIFO,
    stat.S_IFSOCK: FT_SOCK,
    stat.S_IFLNK: FT_LNK,
}

XATTR_IBODY_HEADER = struct.Struct("<IB7x")  # h_name_filter, h_shared_count
XATTR_ENTRY = struct.Struct("<BBH")  # e_name_len, e_name_index, e_value_size
XATTR_FILTER_SEED = 0x25BBE08F
# Index -> prefix; the kernel only resolves these (index 5, lustre., is not wired up).
XATTR_PREFIXES: dict[int, bytes] = {
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    6: b"security.",
}
# Longest first, so system.posix_acl_* never falls to a shorter prefix.
_PREFIX_ORDER = sorted(XATTR_PREFIXES.items(), key=lambda kv: -len(kv[1]))

XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 0xFFFF  # e_value_size is a u16
XATTR_ICOUNT_MAX = 0xFFFF
SHARED_MAX = 0xFF  # h_shared_count is a u8

OVERLAY_PREFIX = b"trusted.overlay."
OVERLAY_ESCAPED = b"trusted.overlay.overlay."
METACOPY = b"trusted.overlay.metacopy"
REDIRECT = b"trusted.overlay.redirect"


@lru_cache(maxsize=65536)
def split_xattr_name(name: bytes) -> tuple[int, bytes] | None:
    """(prefix index, suffix) of a full xattr name, or None if EROFS has no prefix for it."""
    for index, prefix in _PREFIX_ORDER:
        if name.startswith(prefix):
            return index, name[len(prefix) :]
    return None


@lru_cache(maxsize=65536)
def filter_bit(index: int, suffix: bytes) -> int:
    """The xattr name filter bit of a name (the filter stores 1 for names that are absent)."""
    return 1 << (xxh32(suffix, XATTR_FILTER_SEED + index) & 31)


def xattr_entry_size(suffix: bytes, value: bytes) -> int:
    return align(XATTR_ENTRY.size + len(suffix) + len(value), 4)


def align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def new_encode_dev(rdev: int) -> int:
    """st_rdev -> the kernel's 32-bit new_encode_dev() form stored in i_u."""
    major, minor = os.major(rdev), os.minor(rdev)
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def new_decode_dev(value: int) -> int:
    major = (value & 0xFFF00) >> 8
    minor = (value & 0xFF) | ((value >> 12) & 0xFFF00)
    return os.makedev(major, minor)
