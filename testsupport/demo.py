"""The main job for now: a storage demo on loop ext4 and XFS filesystems.

Copies a real tree onto each filesystem (as a containers-storage diff/ would hold it), adds every
file to a composefs repository on the same filesystem, and shows how the data was shared
(reflinked, hardlinked, copied) and what the import cost on disk next to what a plain copy costs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bootc_unified.repository import Method, Repository
from harness.loopfs import LoopFs, missing_prerequisites
from testsupport.treeadd import add_tree, copy_tree, sync_fs, tree_bytes

KINDS = ("ext4", "xfs")


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def demo_one(kind: str, tree: Path, workdir: Path) -> list[str]:
    files, size = tree_bytes(tree)
    with LoopFs.create(kind, workdir, size=3 * size + (1 << 30)) as fs:
        src = fs.path / "storage" / "overlay" / "demo" / "diff"
        src.parent.mkdir(parents=True)
        copy_tree(tree, src)
        sync_fs(fs.path)
        repo = Repository.init(fs.path / "composefs", insecure=True)
        before = fs.statvfs_used_bytes()
        result = add_tree(repo, src, zerocopy=True)
        sync_fs(fs.path)
        extra = fs.statvfs_used_bytes() - before
        m = result.stats.by_method
        return [
            kind,
            f"{files:,}",
            mib(size),
            f"{m[Method.REFLINKED].objects:,}",
            f"{m[Method.HARDLINKED].objects:,}",
            f"{m[Method.COPIED].objects:,}",
            f"{m[Method.PRESENT].objects:,}",
            f"{result.seconds:.1f} s",
            f"{mib(extra)} ({100 * extra / max(size, 1):.1f}%)",
            mib(size),
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", nargs="?", type=Path, default=Path("/usr/share"))
    args = parser.parse_args()
    console = Console(width=160)
    problems = missing_prerequisites(KINDS)
    if problems:
        console.print(f"demo: cannot make loop filesystems: {'; '.join(problems)}")
        return 1
    if not args.tree.is_dir():
        console.print(f"demo: {args.tree}: not a directory")
        return 1
    table = Table(title=f"Adding {args.tree} to a composefs repository on the same filesystem")
    for col in [
        "fs",
        "files",
        "bytes",
        "reflinked",
        "hardlinked",
        "copied",
        "already present",
        "time",
        "extra disk used",
        "a plain copy would use",
    ]:
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory(prefix="bootc-unified-demo-") as tmp:
        for kind in KINDS:
            console.print(f"[bold]{kind}[/]: copying {args.tree} in, then adding it to the repository ...")
            table.add_row(*demo_one(kind, args.tree, Path(tmp)))
    console.print(table)
    console.print(
        "Identical contents are stored once ('already present'); the rest share the source's data "
        "blocks (reflink) or inode (hardlink): the extra disk used is filesystem metadata."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
