#!/usr/bin/env python3
"""Benchmark: the ostree backend's zero-copy import vs bootc's tar path, same image, same run.

Per filesystem (btrfs, XFS, ext4), on a fresh loop filesystem holding the containers-storage and two
bare ostree repositories, synced statvfs before/after each:
  - ours: `import_image` (reflink / hardlink objects, one `ostree commit --link-checkout-speedup`);
  - theirs: what bootc does (testsupport/ostree_reference.py): each bit-exact layer tar through
    `ostree commit --tree=tar=`, union checkout, commit, so every byte is written again;
  - the image's file bytes (its diff/ trees) as the yardstick; and both wall times.
The two commits must have equal root checksums (else the figures compare different things).

Usage: bench/ostree_import.py [--source DIR ...] [--fs btrfs,xfs,ext4]
The image is built with buildah, one layer per --source (default: /usr/bin, /usr/share/doc). Root.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bootc_unified.cstorage import Store
from bootc_unified.ostree.importer import import_image
from bootc_unified.ostree.repo import OstreeRepo, ostree_version
from harness.loopfs import LoopFs
from testsupport.cstore_fixtures import build_layered_image, make_store_dirs, release_store
from testsupport.ostree_reference import reference_commit
from testsupport.treeadd import sync_fs, tree_bytes

IMAGE = "localhost/bench-ostree:latest"
DEFAULT_SOURCES = ["/usr/bin", "/usr/share/doc"]


def mib(n: int, whole: int) -> str:
    return f"{n / 2**20:.1f} MiB ({100 * n / whole:.1f}%)"


def bench_one(kind: str, sources: list[str], workdir: Path) -> list[str]:
    size = sum(tree_bytes(Path(s))[1] for s in sources)
    retain_var = ostree_version() >= (2024, 3)
    with LoopFs.create(kind, workdir, size=4 * size + (1 << 30)) as fs:
        dirs = make_store_dirs(fs.path / "store")
        try:
            build_layered_image(dirs, sources, IMAGE)
            store = Store.open(dirs.root)
            image = store.image(IMAGE)
            image_bytes = sum(tree_bytes(layer.diff_path)[1] for layer in image.layers)

            ours = OstreeRepo.init(fs.path / "ours")
            sync_fs(fs.path)
            used = fs.statvfs_used_bytes()
            start = time.perf_counter()
            result = import_image(ours, store, IMAGE, retain_var=retain_var)
            ours_s = time.perf_counter() - start
            sync_fs(fs.path)
            ours_extra = fs.statvfs_used_bytes() - used

            theirs = OstreeRepo.init(fs.path / "theirs")
            sync_fs(fs.path)
            used = fs.statvfs_used_bytes()
            start = time.perf_counter()
            ref = reference_commit(theirs.path, image, fs.path / "work", retain_var)
            theirs_s = time.perf_counter() - start
            sync_fs(fs.path)
            theirs_extra = fs.statvfs_used_bytes() - used

            same = ours.root_checksums(result.commit) == theirs.root_checksums(ref.commit)
            shared = result.placed["reflinked" if kind != "ext4" else "hardlinked"].bytes
            copied = result.placed["copied"].bytes
        finally:
            release_store(dirs)
    return [
        kind,
        f"{image_bytes / 2**20:.1f} MiB",
        mib(ours_extra, image_bytes),
        mib(theirs_extra, image_bytes),
        f"{ours_s:.1f} s / {theirs_s:.1f} s",
        f"{shared / 2**20:.1f} / {copied / 2**20:.1f} MiB",
        "yes" if same else "NO",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", action="append", help="a directory to make one layer of")
    ap.add_argument("--fs", default="btrfs,xfs,ext4")
    args = ap.parse_args()
    sources = args.source or DEFAULT_SOURCES
    table = Table(title="ostree import: ours (zero-copy) vs bootc's tar path, extra disk after sync")
    for col in ["fs", "image", "ours", "theirs (tar)", "time ours / theirs", "shared / copied", "same tree"]:
        table.add_column(col)
    with tempfile.TemporaryDirectory(prefix="bench-ostree-") as tmp:
        for kind in args.fs.split(","):
            table.add_row(*bench_one(kind, sources, Path(tmp) / kind))
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
