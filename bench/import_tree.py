#!/usr/bin/env python3
"""Benchmark: add a real tree to a repository on btrfs, XFS and ext4, against the floor.

For each filesystem: copy TREE onto a fresh loop filesystem, then, page cache warm and cold (caches
dropped before each timed step), time the floor on the same tree in the same run (the zero-copy
copy: `cp -a --reflink=always` on btrfs/XFS, `cp -al` on ext4; plus `fsverity digest` of every file
with the repository's algorithm) and the repository add, into a fresh repository each time. Also
measures extra data blocks (statvfs before/after, synced) as a fraction of the tree's bytes, next to
the same figure for the zero-copy copy. Prints a table; ratios are against the floor measured here,
now.

Usage: bench/import_tree.py [TREE] [--fs btrfs,xfs,ext4] [--workers N] [--cache warm,cold]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bootc_unified.repository import Method, Repository
from harness.loopfs import LoopFs
from testsupport.treeadd import add_tree, copy_tree, drop_caches, measure_floor, sync_fs, tree_bytes


def bench_one(
    kind: str, tree: Path, workdir: Path, workers: int | None, caches: list[str]
) -> list[list[str]]:
    rows = []
    with LoopFs.create(kind, workdir, size=4 * tree_bytes(tree)[1] + (2 << 30)) as fs:
        src = fs.path / "src"
        copy_tree(tree, src)
        files, size = tree_bytes(src)
        for cache in caches:
            cold = cache == "cold"
            repo_path = fs.path / "composefs"
            repo = Repository.init(repo_path, insecure=True)
            floor = measure_floor(fs, [src], repo.alg, cold, diffid=False)
            sync_fs(fs.path)
            used_before = fs.statvfs_used_bytes()
            if cold:
                drop_caches()
            result = add_tree(repo, src, zerocopy=True, workers=workers)
            sync_fs(fs.path)
            extra = fs.statvfs_used_bytes() - used_before
            methods = result.stats.by_method
            zc = methods[Method.REFLINKED].objects + methods[Method.HARDLINKED].objects
            rows.append(
                [
                    kind,
                    cache,
                    str(files),
                    f"{size / 2**20:.0f} MiB",
                    floor.parts(),
                    f"{floor.seconds:.2f}",
                    f"{result.seconds:.2f}",
                    f"{result.seconds / floor.seconds:.2f}x",
                    f"{zc} zc / {methods[Method.PRESENT].objects} dup / {methods[Method.COPIED].objects} cp",
                    f"{extra / 2**20:.1f} MiB ({100 * extra / size:.2f}%)",
                    f"{floor.copy_extra_bytes / 2**20:.1f} MiB ({100 * floor.copy_extra_bytes / size:.2f}%)",
                ]
            )
            shutil.rmtree(repo_path)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("tree", nargs="?", type=Path, default=Path("/usr/share"))
    parser.add_argument("--fs", default="btrfs,xfs,ext4")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--cache", default="warm,cold")
    args = parser.parse_args()
    table = Table(title=f"repository add of {args.tree} (insecure repo, zerocopy) vs the floor")
    for col in [
        "fs",
        "cache",
        "files",
        "bytes",
        "floor parts s",
        "floor s",
        "ours s",
        "ratio",
        "objects",
        "extra",
        "copy extra",
    ]:
        table.add_column(col)
    with tempfile.TemporaryDirectory(prefix="bench-import-", dir="/var/tmp") as tmp:
        for kind in args.fs.split(","):
            for row in bench_one(kind, args.tree, Path(tmp), args.workers, args.cache.split(",")):
                table.add_row(*row)
    Console(width=220).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
