#!/usr/bin/env python3
"""Benchmark: import a large real image from a containers-storage into a composefs repository.

Per filesystem (btrfs, XFS, ext4), on a fresh loop filesystem holding both the store and the
repository, page cache warm and cold (caches dropped before each timed step), measured in the same
run into a fresh repository each time:
  - the floor: the filesystem's zero-copy copy of the layers' diff/ trees (`cp -a --reflink=always`
    on btrfs/XFS, `cp -al` on ext4), `fsverity digest` of every file, and sha256 of every file's
    bytes (the DiffID hash);
  - the import (layer splitstreams, zero-copy objects, the EROFS image), and its ratio to the floor;
  - extra data (statvfs before/after, synced) as a fraction of the image's bytes, next to the same
    figure for the zero-copy copy;
  - re-import of the image once all of its layers are present;
  - an update: the image plus one small layer (1 MiB), imported with its EROFS image once the
    image is, as a share of the import (issue 13: <= 10%);
  - EROFS image creation from the layer streams vs `mkfs.erofs` of the same flattened tree
    (podman's own mount of the image), page cache warm.

Usage: bench/import_image.py [--source DIR ...] [--fs btrfs,xfs,ext4] [--cache warm,cold]
The image is built with buildah, one layer per --source (default: /usr/bin, /usr/lib/python3.11,
/usr/share). Runs as root; not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bootc_unified.cstorage import Store
from bootc_unified.importer import create_image, import_image
from bootc_unified.repository import Method, Repository
from harness.loopfs import LoopFs
from testsupport.cstore_fixtures import StoreDirs, build_layered_image, make_store_dirs, release_store
from testsupport.treeadd import drop_caches, measure_floor, sync_fs, tree_bytes

IMAGE = "localhost/bench-import:latest"
UPDATE = "localhost/bench-import:update"  # IMAGE + one small layer
DEFAULT_SOURCES = ["/usr/bin", f"/usr/lib/python3.{sys.version_info.minor}", "/usr/share"]


def pct(part: int, whole: int) -> str:
    return f"{part / 2**20:.1f} MiB ({100 * part / whole:.2f}%)"


def bench_one(kind: str, sources: list[str], workdir: Path, caches: list[str]) -> list[list[str]]:
    size = sum(tree_bytes(Path(s))[1] for s in sources)
    rows = []
    with LoopFs.create(kind, workdir, size=4 * size + (2 << 30)) as fs:
        dirs = make_store_dirs(fs.path / "store")
        try:
            build_layered_image(dirs, sources, IMAGE)
            _build_update(dirs, workdir)
            store = Store.open(dirs.root)
            image = store.image(IMAGE)
            diffs = [layer.diff_path for layer in image.layers]
            image_bytes = sum(tree_bytes(d)[1] for d in diffs)
            sync_fs(fs.path)
            for cache in caches:
                cold = cache == "cold"
                repo_path = fs.path / "composefs"
                repo = Repository.init(repo_path, insecure=True)
                floor = measure_floor(fs, diffs, repo.alg, cold, diffid=True)
                sync_fs(fs.path)
                used = fs.statvfs_used_bytes()
                if cold:
                    drop_caches()
                image_s: list[float] = []
                start = time.monotonic()
                result = import_image(repo, store, IMAGE, zerocopy=True, build_image=_timed(image_s))
                total_s = time.monotonic() - start
                sync_fs(fs.path)
                extra = fs.statvfs_used_bytes() - used
                start = time.monotonic()
                import_image(repo, store, IMAGE, zerocopy=True, build_image=None)
                reimport_s = time.monotonic() - start
                if cold:
                    drop_caches()
                start = time.monotonic()
                import_image(repo, store, UPDATE, zerocopy=True, build_image=create_image)
                update_s = time.monotonic() - start
                m = result.stats.by_method
                rows.append(
                    [
                        kind,
                        cache,
                        f"{len(image.layers)} / {result.stats.objects}",
                        f"{image_bytes / 2**20:.0f} MiB",
                        floor.parts(),
                        f"{floor.seconds:.2f}",
                        f"{total_s - image_s[0]:.2f} + {image_s[0]:.2f}",
                        f"{total_s:.2f}",
                        f"{total_s / floor.seconds:.2f}x",
                        f"{m[Method.REFLINKED].objects}/{m[Method.HARDLINKED].objects}/{m[Method.COPIED].bytes}",
                        pct(extra, image_bytes),
                        pct(floor.copy_extra_bytes, image_bytes),
                        f"{reimport_s:.2f} ({100 * reimport_s / total_s:.1f}%)",
                        f"{update_s:.2f} ({100 * update_s / total_s:.1f}%)",
                    ]
                )
                shutil.rmtree(repo_path)
            if "warm" in caches:
                rows[caches.index("warm")].append(_erofs_vs_mkfs(kind, store, dirs, fs.path, workdir))
        finally:
            release_store(dirs)
    return rows


def _build_update(dirs: StoreDirs, workdir: Path) -> None:
    """UPDATE: IMAGE plus one small layer (a 1 MiB file), as an upgrade that changes one thing."""
    src = workdir / "update-layer"
    src.mkdir(exist_ok=True)
    (src / "changed").write_bytes(os.urandom(1 << 20))
    base = dirs.buildah()

    def buildah(*argv: str) -> str:
        return subprocess.run([*base, *argv], env=dirs.env, check=True, capture_output=True, text=True).stdout

    ctr = buildah("from", "--pull-never", IMAGE).strip()
    try:
        buildah("copy", ctr, str(src), "/update")
        buildah("commit", "--quiet", ctr, UPDATE)
    finally:
        subprocess.run([*base, "rm", ctr], env=dirs.env, capture_output=True)


def _timed(seconds: list[float]) -> Callable[[Repository, list[tuple[str, str]]], str]:
    """create_image, appending the seconds it took to `seconds`."""

    def build(repo: Repository, layers: list[tuple[str, str]]) -> str:
        start = time.monotonic()
        try:
            return create_image(repo, layers)
        finally:
            seconds.append(time.monotonic() - start)

    return build


def _erofs_vs_mkfs(kind: str, store: Store, dirs: StoreDirs, fs_path: Path, workdir: Path) -> str:
    """EROFS image creation from the layer streams vs `mkfs.erofs` of the same flattened tree
    (podman's own mount of the image), page cache warm."""
    repo = Repository.init(fs_path / "composefs-erofs", insecure=True)
    import_image(repo, store, IMAGE, zerocopy=True, build_image=None)
    layers = [
        (la.diff_id, repo.has_stream(f"oci-layer-{la.diff_id}") or "") for la in store.image(IMAGE).layers
    ]
    start = time.monotonic()
    create_image(repo, layers)
    erofs_s = time.monotonic() - start
    mnt = Path(
        subprocess.run(
            dirs.podman("image", "mount", IMAGE), env=dirs.env, check=True, capture_output=True, text=True
        ).stdout.strip()
    )
    out = workdir / f"{kind}-mkfs.erofs"
    try:
        start = time.monotonic()
        subprocess.run(["mkfs.erofs", str(out), str(mnt)], check=True, capture_output=True)
        mkfs_s = time.monotonic() - start
    finally:
        subprocess.run(dirs.podman("image", "unmount", IMAGE), env=dirs.env, capture_output=True)
        out.unlink(missing_ok=True)
    shutil.rmtree(repo.path)
    return f"{erofs_s:.1f} vs {mkfs_s:.1f} ({erofs_s / mkfs_s:.2f}x)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", action="append", help="a directory for one layer (repeatable)")
    parser.add_argument("--fs", default="btrfs,xfs,ext4")
    parser.add_argument("--cache", default="warm,cold")
    args = parser.parse_args()
    sources = args.source or DEFAULT_SOURCES
    table = Table(
        title=f"import of an image built from {', '.join(sources)} (insecure repo, --zerocopy) vs the floor"
    )
    columns = [
        "fs",
        "cache",
        "layers / objects",
        "bytes",
        "floor parts s",
        "floor s",
        "streams + EROFS s",
        "ours s",
        "ratio",
        "reflinked/hardlinked/copied bytes",
        "extra",
        "copy extra",
        "re-import s (of import)",
        "update s (of import)",
        "EROFS s vs mkfs.erofs s",
    ]
    for col in columns:
        table.add_column(col)
    with tempfile.TemporaryDirectory(prefix="bench-import-", dir="/var/tmp") as tmp:
        for kind in args.fs.split(","):
            for row in bench_one(kind, sources, Path(tmp), args.cache.split(",")):
                table.add_row(*row, *([""] * (len(columns) - len(row))))
    Console(width=260).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
