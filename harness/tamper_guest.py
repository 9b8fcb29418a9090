"""Change one byte of a file's data behind its filesystem's back (issue 12, R5), in the guest.

    python3 -m harness.tamper_guest FILE OFFSET

finds where byte OFFSET of FILE lives on the block device (FS_IOC_FIEMAP; on btrfs the extent's
address is a logical one, mapped to the device with `btrfs-map-logical`), inverts that byte with a
write to the block device itself (not through the file, so neither fs-verity nor the filesystem
sees the write), and drops the page cache so the next read of FILE comes from the disk. Prints
one JSON object: device, physical offset, the byte before and after.

Standard library only (it runs with the guest's python3, like harness.zerocopy_audit).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from harness.checks import (
    FIEMAP_EXTENT_DATA_INLINE,
    FIEMAP_EXTENT_DELALLOC,
    FIEMAP_EXTENT_ENCODED,
    FIEMAP_EXTENT_NOT_ALIGNED,
    FIEMAP_EXTENT_UNKNOWN,
    fiemap,
)

UNMAPPABLE = (
    FIEMAP_EXTENT_DATA_INLINE
    | FIEMAP_EXTENT_DELALLOC
    | FIEMAP_EXTENT_ENCODED
    | FIEMAP_EXTENT_NOT_ALIGNED
    | FIEMAP_EXTENT_UNKNOWN
)


def source_device(path: str) -> tuple[str, str]:
    """(block device, filesystem type) of the filesystem holding `path`."""
    out = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--target", path], check=True, capture_output=True, text=True
    ).stdout.split()
    return re.sub(r"\[.*\]$", "", out[0]), out[1]


def btrfs_physical(device: str, logical: int) -> int:
    out = subprocess.run(
        ["btrfs-map-logical", "-l", str(logical), device], check=True, capture_output=True, text=True
    ).stdout
    found = re.search(r"mirror 1 logical \d+ physical (\d+) device (\S+)", out)
    if found is None or found.group(2) != device:
        raise SystemExit(f"btrfs-map-logical {logical} {device}: unexpected answer {out.strip()!r}")
    return int(found.group(1))


def locate(path: str, offset: int) -> tuple[str, int]:
    """(device, byte offset on it) of byte `offset` of `path`'s data."""
    device, fstype = source_device(path)
    for extent in fiemap(path):
        if extent.logical <= offset < extent.logical + extent.length:
            if extent.flags & UNMAPPABLE:
                raise SystemExit(f"{path}: byte {offset} is in an extent with flags {extent.flags:#x}")
            address = extent.physical + offset - extent.logical
            return device, btrfs_physical(device, address) if fstype == "btrfs" else address
    raise SystemExit(f"{path}: byte {offset} is in no extent (a hole?)")


def flip(device: str, physical: int) -> tuple[int, int]:
    fd = os.open(device, os.O_RDWR)
    try:
        old = os.pread(fd, 1, physical)[0]
        new = old ^ 0xFF
        os.pwrite(fd, bytes([new]), physical)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return old, new


def main(argv: list[str]) -> int:
    path, offset = argv[0], int(argv[1])
    device, physical = locate(path, offset)
    old, new = flip(device, physical)
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    print(
        json.dumps(
            {"file": path, "offset": offset, "device": device, "physical": physical, "old": old, "new": new}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
