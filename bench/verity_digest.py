#!/usr/bin/env python3
"""Benchmark: fs-verity digest throughput vs `sha512sum` (and `fsverity digest`) of the same file.

Both run in this process's run on a file in the page cache, best of N; the ratio shows how close
the Python Merkle tree stays to plain hashing (the tree hashes every byte once more per 1/64).

Usage: bench/verity_digest.py [--size-mib 512] [--repeat 3] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bootc_unified import verity
from bootc_unified.verity import HashAlg
from testsupport.benchutil import best_of


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile(dir=args.dir, prefix="verity-bench-") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(args.size_mib):
            f.write(chunk)
        f.flush()
        path = Path(f.name)
        size = path.stat().st_size
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the cache

        def tool(*argv: str) -> Callable[[], object]:
            return lambda: subprocess.run([*argv, str(path)], stdout=subprocess.DEVNULL, check=True)

        base = best_of(args.repeat, tool("sha512sum"))
        print(f"file: {size / 2**20:.0f} MiB, best of {args.repeat}")
        print(f"{'sha512sum':28} {size / base / 2**20:8.0f} MB/s  1.00x")
        for label, fn in [
            ("fsverity digest sha512", tool("fsverity", "digest", "--hash-alg=sha512")),
            ("ours sha512", lambda: verity.digest_file(path, HashAlg.SHA512)),
            ("fsverity digest sha256", tool("fsverity", "digest", "--hash-alg=sha256")),
            ("ours sha256", lambda: verity.digest_file(path, HashAlg.SHA256)),
        ]:
            t = best_of(args.repeat, fn)
            print(f"{label:28} {size / t / 2**20:8.0f} MB/s  {t / base:.2f}x the time of sha512sum")
    return 0


if __name__ == "__main__":
    sys.exit(main())
