"""Independent oracles for zero-copy: FIEMAP extent flags, inode identity, link counts.

These read what the kernel says about files and never call bootc_unified code.
"""

from __future__ import annotations

import array
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_NOT_ALIGNED = 0x100
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_DATA_TAIL = 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_MERGED = 0x1000
FIEMAP_EXTENT_SHARED = 0x2000

_HEADER = struct.Struct("=QQLLLL")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, pad
_EXTENT = struct.Struct("=QQQQQLLLL")  # logical, physical, length, reserved64[2], flags, reserved[3]
_BATCH = 256


@dataclass(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    flags: int

    @property
    def shared(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_SHARED)

    @property
    def inline(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_DATA_INLINE)


def fiemap(path: str | os.PathLike[str], sync: bool = True) -> list[Extent]:
    """All extents of a file, as FS_IOC_FIEMAP reports them (FIEMAP_FLAG_SYNC by default)."""
    extents: list[Extent] = []
    start = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            buf = array.array(
                "B",
                _HEADER.pack(start, 2**64 - 1 - start, FIEMAP_FLAG_SYNC if sync else 0, 0, _BATCH, 0)
                + bytes(_EXTENT.size * _BATCH),
            )
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            mapped = _HEADER.unpack_from(buf, 0)[3]
            if mapped == 0:
                return extents
            for i in range(mapped):
                logical, physical, length, _, _, flags, _, _, _ = _EXTENT.unpack_from(
                    buf, _HEADER.size + i * _EXTENT.size
                )
                extents.append(Extent(logical, physical, length, flags))
            last = extents[-1]
            if last.flags & FIEMAP_EXTENT_LAST:
                return extents
            start = last.logical + last.length
    finally:
        os.close(fd)


def all_extents_shared(path: str | os.PathLike[str]) -> bool:
    """True when the file has data and every extent carries FIEMAP_EXTENT_SHARED."""
    extents = fiemap(path)
    return bool(extents) and all(e.shared for e in extents)


def same_inode(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def nlink(path: str | os.PathLike[str]) -> int:
    return os.stat(path).st_nlink


def physical_ranges(path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """(physical, length) of each extent: two files share data exactly when these match."""
    return [(e.physical, e.length) for e in fiemap(path)]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
