"""Change one byte of a file's data behind its filesystem's back (issue 12, R5), in the guest.

    python3 -m harness.tamper_guest FILE OFFSET
    python3 -m harness.tamper_guest --fat-dir DEVICE DIR

finds where byte OFFSET of FILE lives on the block device (FS_IOC_FIEMAP; on btrfs the extent's
address is a logical one, mapped to the device with `btrfs-map-logical`), inverts that byte with a
write to the block device itself (not through the file, so neither fs-verity nor the filesystem
sees the write), and drops the page cache so the next read of FILE comes from the disk. Prints
one JSON object: device, physical offset, the byte before and after.

`--fat-dir`: the FAT filesystem on DEVICE (unmounted; a device or an image file) as a power cut
can leave it: directory DIR's entry in its parent written, its first cluster (its own entries)
and that cluster's FAT entry not (zeroed: free). The cluster is found with mtools' `mshowfat`,
the offsets from the boot sector's own fields (FAT16 and FAT32).

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


def fat_layout(device: str) -> dict[str, int]:
    """The boot sector's geometry: bytes per sector and cluster, where the FATs and the data area
    start, how many FATs, the FAT entry width (FAT16: 2 bytes, FAT32: 4; FAT12 is refused)."""
    with open(device, "rb") as f:
        boot = f.read(512)
    sector = int.from_bytes(boot[11:13], "little")
    per_cluster = boot[13]
    reserved = int.from_bytes(boot[14:16], "little")
    fats = boot[16]
    root_entries = int.from_bytes(boot[17:19], "little")
    total = int.from_bytes(boot[19:21], "little") or int.from_bytes(boot[32:36], "little")
    fat16_size = int.from_bytes(boot[22:24], "little")
    fat_size = fat16_size or int.from_bytes(boot[36:40], "little")
    root_sectors = (root_entries * 32 + sector - 1) // sector
    data = reserved + fats * fat_size + root_sectors
    clusters = (total - data) // per_cluster
    if fat16_size and clusters < 4085:
        raise SystemExit(f"{device}: FAT12, not handled")
    return {
        "sector": sector,
        "cluster": per_cluster * sector,
        "fat": reserved * sector,
        "fat_bytes": fat_size * sector,
        "fats": fats,
        "data": data * sector,
        "entry": 2 if fat16_size else 4,
    }


def fat_dir_cluster(device: str, path: str) -> int:
    """The first cluster of directory `path` (mtools' `mshowfat`)."""
    out = subprocess.run(
        ["mshowfat", "-i", device, f"::{path}"], check=True, capture_output=True, text=True
    ).stdout
    found = re.search(r"<(\d+)", out)
    if found is None:
        raise SystemExit(f"mshowfat {device} ::{path}: no cluster in {out.strip()!r}")
    return int(found.group(1))


def zero_fat_dir(device: str, path: str) -> dict[str, object]:
    """Directory `path`'s first cluster zeroed and its FAT entry (in every FAT copy) marked free:
    the directory's entry in its parent was written, its cluster and its FAT entry were not."""
    cluster = fat_dir_cluster(device, path)
    geo = fat_layout(device)
    offset = geo["data"] + (cluster - 2) * geo["cluster"]
    fd = os.open(device, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(geo["cluster"]), offset)
        for n in range(geo["fats"]):
            os.pwrite(fd, bytes(geo["entry"]), geo["fat"] + n * geo["fat_bytes"] + cluster * geo["entry"])
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return {"device": device, "dir": path, "cluster": cluster, "offset": offset, "bytes": geo["cluster"]}


def main(argv: list[str]) -> int:
    if argv[0] == "--fat-dir":
        print(json.dumps(zero_fat_dir(argv[1], argv[2])))
        return 0
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
