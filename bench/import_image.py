#!/usr/bin/env python3
"""Benchmark: import a large real image from a containers-storage into a composefs repository.

Per filesystem (btrfs, XFS, ext4), on a fresh loop filesystem holding both the store and the
repository, measured in the same run:
  - import (layer splitstreams, zero-copy objects), seconds, and the ratio to the filesystem's own
    zero-copy copy of the same diff/ trees (`cp -a --reflink=always` on btrfs/XFS, `cp -al` on ext4);
  - extra data (statvfs before/after, synced) as a fraction of the image's bytes, next to the same
    figure for that baseline copy;
  - EROFS image creation from the layer streams vs `mkfs.erofs` of the same flattened tree (podman's
    own mount of the image);
  - re-import of the image once all of its layers are present.

Usage: bench/import_image.py [--source DIR ...] [--fs btrfs,xfs,ext4]
The image is built with buildah, one layer per --source (default: /usr/bin, /usr/lib/python3.11,
/usr/share). Runs as root; not part of the test suite.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bootc_unified.cstorage import Store
from bootc_unified.importer import create_image, import_image
from bootc_unified.repository import Method, Repository
from harness.loopfs import LoopFs
from testsupport.cstore_fixtures import build_layered_image, make_store_dirs, release_store
from testsupport.treeadd import sync_fs, tree_bytes, zero_copy_baseline

IMAGE = "localhost/bench-import:latest"
DEFAULT_SOURCES = ["/usr/bin", f"/usr/lib/python3.{sys.version_info.minor}", "/usr/share"]


def pct(part: int, whole: int) -> str:
    return f"{part / 2**20:.1f} MiB ({100 * part / whole:.2f}%)"


def bench_one(kind: str, sources: list[str], workdir: Path) -> list[str]:
    size = sum(tree_bytes(Path(s))[1] for s in sources)
    with LoopFs.create(kind, workdir, size=4 * size + (2 << 30)) as fs:
        dirs = make_store_dirs(fs.path / "store")
        try:
            build_layered_image(dirs, sources, IMAGE)
            store = Store.open(dirs.root)
            image = store.image(IMAGE)
            image_bytes = sum(tree_bytes(layer.diff_path)[1] for layer in image.layers)
            sync_fs(fs.path)

            baseline = zero_copy_baseline(fs, [layer.diff_path for layer in image.layers])
            base_s, base_extra = baseline.seconds, baseline.extra_bytes

            repo = Repository.init(fs.path / "composefs", insecure=True)
            used = fs.statvfs_used_bytes()
            start = time.monotonic()
            result = import_image(repo, store, IMAGE, zerocopy=True, build_image=None)
            import_s = time.monotonic() - start
            sync_fs(fs.path)
            extra = fs.statvfs_used_bytes() - used

            layers = [
                (d, repo.has_stream(f"oci-layer-{d}") or "") for d in (la.diff_id for la in image.layers)
            ]
            start = time.monotonic()
            create_image(repo, layers)
            erofs_s = time.monotonic() - start
            mnt = Path(
                subprocess.run(
                    dirs.podman("image", "mount", IMAGE),
                    env=dirs.env,
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.strip()
            )
            try:
                start = time.monotonic()
                subprocess.run(
                    ["mkfs.erofs", str(workdir / f"{kind}-mkfs.erofs"), str(mnt)],
                    check=True,
                    capture_output=True,
                )
                mkfs_s = time.monotonic() - start
            finally:
                subprocess.run(dirs.podman("image", "unmount", IMAGE), env=dirs.env, capture_output=True)
                (workdir / f"{kind}-mkfs.erofs").unlink(missing_ok=True)

            start = time.monotonic()
            import_image(repo, store, IMAGE, zerocopy=True, build_image=None)
            reimport_s = time.monotonic() - start
        finally:
            release_store(dirs)
    m = result.stats.by_method
    return [
        kind,
        f"{len(image.layers)} / {result.stats.objects}",
        f"{image_bytes / 2**20:.0f} MiB",
        f"{import_s:.1f}",
        f"{baseline.mode} {base_s:.1f}",
        f"{import_s / base_s:.1f}x",
        f"{m[Method.REFLINKED].objects}/{m[Method.HARDLINKED].objects}/{m[Method.COPIED].bytes}",
        pct(extra, image_bytes),
        pct(base_extra, image_bytes),
        f"{erofs_s:.1f} vs {mkfs_s:.1f} ({erofs_s / mkfs_s:.2f}x)",
        f"{reimport_s:.2f}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", action="append", help="a directory for one layer (repeatable)")
    parser.add_argument("--fs", default="btrfs,xfs,ext4")
    args = parser.parse_args()
    sources = args.source or DEFAULT_SOURCES
    table = Table(title=f"import of an image built from {', '.join(sources)} (insecure repo, --zerocopy)")
    columns = [
        "fs",
        "layers / objects",
        "bytes",
        "import s",
        "baseline s",
        "ratio",
        "reflinked/hardlinked/copied bytes",
        "extra",
        "baseline extra",
        "EROFS s vs mkfs.erofs s",
        "re-import s",
    ]
    for col in columns:
        table.add_column(col)
    with tempfile.TemporaryDirectory(prefix="bench-import-", dir="/var/tmp") as tmp:
        for kind in args.fs.split(","):
            table.add_row(*bench_one(kind, sources, Path(tmp)))
    Console(width=220).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
