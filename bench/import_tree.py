#!/usr/bin/env python3
"""Benchmark: add a real tree to a repository on btrfs, XFS and ext4.

For each filesystem: copy TREE onto a fresh loop filesystem, time the zero-copy baseline on the
same tree in the same run (`cp -a --reflink=always` on btrfs/XFS, `cp -al` on ext4), then time the
repository add, and measure extra data blocks (statvfs before/after, synced) as a fraction of the
tree's bytes, next to the same figure for the baseline copy (the filesystem's own cost of new
inodes and extent references). Prints a table; ratios are against the baseline measured here, now.

Usage: bench/import_tree.py [TREE] [--fs btrfs,xfs,ext4] [--workers N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bootc_unified.repository import Method, Repository
from harness.loopfs import LoopFs
from testsupport.treeadd import add_tree, copy_tree, sync_fs, tree_bytes, zero_copy_baseline


def bench_one(kind: str, tree: Path, workdir: Path, workers: int | None) -> list[str]:
    with LoopFs.create(kind, workdir, size=4 * tree_size_hint(tree) + (2 << 30)) as fs:
        src = fs.path / "src"
        copy_tree(tree, src)
        files, size = tree_bytes(src)
        baseline = zero_copy_baseline(fs, [src])
        repo = Repository.init(fs.path / "composefs", insecure=True)
        used_before = fs.statvfs_used_bytes()
        result = add_tree(repo, src, zerocopy=True, workers=workers)
        sync_fs(fs.path)
        extra = fs.statvfs_used_bytes() - used_before
        methods = result.stats.by_method
        zc = methods[Method.REFLINKED].objects + methods[Method.HARDLINKED].objects
        return [
            kind,
            str(files),
            f"{size / 2**20:.0f} MiB",
            f"{result.seconds:.1f}",
            f"{baseline.mode} {baseline.seconds:.1f}",
            f"{result.seconds / baseline.seconds:.1f}x",
            f"{zc} zc / {methods[Method.PRESENT].objects} dup / {methods[Method.COPIED].objects} cp",
            f"{extra / 2**20:.1f} MiB ({100 * extra / size:.2f}%)",
            f"{baseline.extra_bytes / 2**20:.1f} MiB ({100 * baseline.extra_bytes / size:.2f}%)",
        ]


def tree_size_hint(tree: Path) -> int:
    return tree_bytes(tree)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("tree", nargs="?", type=Path, default=Path("/usr/share"))
    parser.add_argument("--fs", default="btrfs,xfs,ext4")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    table = Table(title=f"repository add of {args.tree} (insecure repo, zerocopy)")
    for col in [
        "fs",
        "files",
        "bytes",
        "import s",
        "baseline s",
        "ratio",
        "objects",
        "extra",
        "baseline extra",
    ]:
        table.add_column(col)
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        for kind in args.fs.split(","):
            table.add_row(*bench_one(kind, args.tree, Path(tmp), args.workers))
    Console(width=200).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
