#!/usr/bin/env python3
"""Benchmark: composefs EROFS image creation vs `mkfs.erofs` of the same directory tree.

The tree is read once from disk (`from_directory`, timed separately); object IDs of files over
64 bytes are FAKED as sha512(path) so the writer is measured, not content hashing (that is
bench/verity_digest.py). Then `write_image` (best of N) against `mkfs.erofs --preserve-mtime`
(uncompressed, best of N) on the same directory with a warm page cache. mkfs.erofs copies file
data into its image, ours stores none (the data lives in objects/), so mkfs.erofs does more I/O:
the ratio shows what the metadata-only Python writer costs relative to the C tool.

Usage: bench/erofs_create.py [--tree /usr/share] [--repeat 3] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bootc_unified.erofs import from_directory, write_image
from bootc_unified.erofs.tree import walk
from bootc_unified.verity import HashAlg
from testsupport.benchutil import best_of


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--tree", type=Path, default=Path("/usr/share"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()

    def fake_id(path: Path) -> str:
        return hashlib.sha512(os.fsencode(path)).hexdigest()

    start = time.perf_counter()
    tree = from_directory(args.tree, fake_id)
    walk_time = time.perf_counter() - start
    entries = sum(1 for _ in walk(tree))

    image = b""

    def ours() -> None:
        nonlocal image
        image = write_image(tree, HashAlg.SHA512)

    ours_time = best_of(args.repeat, ours)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="erofs-bench-") as tmp:
        out = Path(tmp) / "mkfs.erofs.img"
        argv = ["mkfs.erofs", "--quiet", "--preserve-mtime", str(out), str(args.tree)]
        subprocess.run(argv, check=True, capture_output=True)  # warm the page cache with one run
        mkfs_time = best_of(args.repeat, lambda: subprocess.run(argv, check=True, capture_output=True))
        mkfs_size = out.stat().st_size
        ours_img = Path(tmp) / "ours.cfs"
        ours_img.write_bytes(image)
        fsck = subprocess.run(["fsck.erofs", str(ours_img)], capture_output=True, text=True)

    print(f"tree: {args.tree}, {entries} entries; object IDs faked as sha512(path); best of {args.repeat}")
    print(f"{'from_directory (walk, read)':30} {walk_time:7.2f} s")
    print(
        f"{'write_image (ours)':30} {ours_time:7.2f} s  image {len(image) / 2**20:7.1f} MiB"
        f"  fsck.erofs rc={fsck.returncode}"
    )
    print(f"{'mkfs.erofs 1.5 (with data)':30} {mkfs_time:7.2f} s  image {mkfs_size / 2**20:7.1f} MiB")
    print(f"ratio write_image / mkfs.erofs: {ours_time / mkfs_time:.2f}x")
    print(f"ratio (walk + write_image) / mkfs.erofs: {(walk_time + ours_time) / mkfs_time:.2f}x")
    return 0 if fsck.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
