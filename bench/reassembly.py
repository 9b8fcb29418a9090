#!/usr/bin/env python3
"""Benchmark: layer reassembly (tar-split + diff/ -> tar, sha256-verified) vs `skopeo copy` to an OCI dir.

Builds a multi-hundred-MiB image from directories of this machine (one layer per directory, with
buildah) in a private overlay store under a temporary directory, then times, on the same image and in
the same run:
  - reassembly, hash only (what an importer needs: every layer checked against its DiffID);
  - reassembly written to files (one tar per layer, like an OCI layout's blobs);
  - `skopeo copy containers-storage:[overlay@ROOT+RUNROOT]IMG oci:DIR` (what containers/image does).
Each is run --rounds times after one warm-up (page cache warm for all: this measures CPU/IO paths, not the
disk), and the best time is reported with the ratio skopeo/reassembly.

Usage: python3 bench/reassembly.py [--source DIR ...] [--rounds N] [--workdir DIR] [--keep]
Runs as root (podman/buildah stores); not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bootc_unified.cstorage import Store, reassemble
from harness.run import run
from testsupport.benchutil import best_of
from testsupport.cstore_fixtures import build_layered_image, make_store_dirs, release_store

DEFAULT_SOURCES = ["/usr/bin", "/usr/libexec", f"/usr/lib/python3.{sys.version_info.minor}"]
IMAGE = "localhost/bench-reassembly:latest"


def layer_media_types(oci: Path) -> str:
    index = json.loads((oci / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((oci / "blobs" / "sha256" / manifest_digest).read_text())
    return ", ".join(sorted({layer["mediaType"] for layer in manifest["layers"]}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", action="append", help="directory to put in a layer (repeatable)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", type=Path, help="where to build the store (default: a temp dir in /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    sources = args.source or DEFAULT_SOURCES

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-reassembly-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    dirs = make_store_dirs(work / "store")
    try:
        t0 = time.perf_counter()
        build_layered_image(dirs, sources, IMAGE)
        print(f"built {IMAGE} from {', '.join(sources)} in {time.perf_counter() - t0:.1f} s", flush=True)

        store = Store.open(dirs.root)
        image = store.image(IMAGE)
        total = sum(layer.size or 0 for layer in image.layers)
        print(f"{len(image.layers)} layers, {total / 2**20:.1f} MiB of tar", flush=True)

        def hash_only() -> None:
            with store.read_lock():
                for layer in image.layers:
                    reassemble(layer)

        out_dir = work / "tars"

        def to_files() -> None:
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir()
            with store.read_lock():
                for layer in image.layers:
                    with open(out_dir / layer.diff_id.split(":")[1], "wb") as f:
                        reassemble(layer, f)

        oci = work / "oci"

        def skopeo(*extra: str) -> Callable[[], None]:
            def copy() -> None:
                shutil.rmtree(oci, ignore_errors=True)
                argv = ["skopeo", "copy", "--quiet", *extra, dirs.transport(IMAGE), f"oci:{oci}:bench"]
                run(argv, env=dirs.env, timeout=3600)

            return copy

        t_hash = best_of(args.rounds, hash_only, warmup=True)
        t_files = best_of(args.rounds, to_files, warmup=True)
        t_skopeo = best_of(args.rounds, skopeo(), warmup=True)
        media = layer_media_types(oci)
        t_plain = best_of(args.rounds, skopeo("--dest-oci-accept-uncompressed-layers"), warmup=True)
        media_plain = layer_media_types(oci)

        mib = total / 2**20
        print(f"reassembly, sha256 only : {t_hash:7.2f} s  {mib / t_hash:8.1f} MiB/s")
        print(f"reassembly, to files    : {t_files:7.2f} s  {mib / t_files:8.1f} MiB/s")
        print(f"skopeo copy -> oci:     : {t_skopeo:7.2f} s  {mib / t_skopeo:8.1f} MiB/s  ({media})")
        print(f"skopeo, uncompressed    : {t_plain:7.2f} s  {mib / t_plain:8.1f} MiB/s  ({media_plain})")
        print(f"ratio skopeo / reassembly (sha256 only): {t_skopeo / t_hash:.2f}x")
        print(f"ratio skopeo / reassembly (to files)   : {t_skopeo / t_files:.2f}x")
        print(f"ratio skopeo uncompressed / reassembly to files: {t_plain / t_files:.2f}x")
    finally:
        release_store(dirs)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
