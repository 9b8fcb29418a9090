#!/usr/bin/env python3
"""Benchmark: bytes fetched for the same update v1 -> v2, gzip vs zstd:chunked, through the bootc store.

The update is harness.chunked's: one layer of FILES incompressible files, rebuilt for v2 with
CHANGED files changed and ADDED added (as when a base image is rebuilt). Both versions are built
with buildah and pushed to a local registry with an access log, once per compression; then, per
compression, a fresh bootc store (bootc_unified.imgstore.ImageStore, podman with the store's pinned
configuration) pulls v1 and then v2. The bytes are what the registry says it sent (its access log),
not what podman reports. Printed: bytes fetched for v2 per compression, and gzip / zstd:chunked.

zstd:chunked is pulled with partial pulls on (`enable_partial_images`), which the store enables by
itself only on podman >= 5.3: this host's podman may pull partially (Debian 12's 4.3 does, from its
own first zstd:chunked format) and yet store a layer the import refuses (no tar-split, no DiffID;
see tests/storage/test_zstd_chunked.py). In the trixie guest (podman 5.4) the same measurement,
with a bit-exact, zero-copy import, is tests/vm/test_zstd_chunked_vm.py.

Usage: python3 bench/zstd_chunked.py [--workdir DIR] [--keep]   (root: buildah, podman)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bootc_unified.imgstore import ImageStore, podman_version
from harness import chunked
from harness.registry import Registry

COMPRESSIONS = ("gzip", chunked.ZSTD_CHUNKED)


def measure(
    registry: Registry, updates: chunked.UpdateImages, compression: str, sysroot: Path
) -> dict[str, chunked.Fetched]:
    """Pull v1, then v2, into a fresh bootc store under `sysroot`; what the registry sent for each."""
    sysroot.mkdir(parents=True)
    store = ImageStore.ensure(sysroot)
    store.partial_pulls = compression == chunked.ZSTD_CHUNKED
    result = {}
    try:
        for name in ("upd-v1", "upd-v2"):
            offset = registry.log_offset()
            store.pull(updates.ref(name, compression), tls_verify=False)
            result[name] = chunked.fetched(registry, offset)
    finally:
        store.cleanup_runtime()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="work directory (default: a temporary one in /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-zstd-chunked-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        with Registry.start(work / "registry", access_log=True) as registry:
            updates = chunked.build_and_push(registry.address, work / "build", COMPRESSIONS)
            results = {c: measure(registry, updates, c, work / c.replace(":", "-")) for c in COMPRESSIONS}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    version = ".".join(map(str, podman_version() or ()))
    print(
        f"podman {version}; update: {chunked.FILES} files of {chunked.FILE_SIZE} bytes, {chunked.CHANGED} "
        f"changed and {chunked.ADDED} added in v2 (new content {chunked.new_content_bytes():,} bytes)"
    )
    for compression in COMPRESSIONS:
        for name, got in results[compression].items():
            layer = updates.layer_sizes[(name, compression)]
            print(
                f"  {compression:13} {name}: {got.blob_bytes:>10,} blob bytes fetched in {got.blob_requests} "
                f"requests ({got.range_requests} ranged); its layer blob is {layer:,} bytes"
            )
    gzip_v2 = results["gzip"]["upd-v2"].blob_bytes
    chunked_v2 = results[chunked.ZSTD_CHUNKED]["upd-v2"].blob_bytes
    ratio = gzip_v2 / max(1, chunked_v2)
    print(f"v1 -> v2 fetched: gzip {gzip_v2:,} bytes, zstd:chunked {chunked_v2:,} bytes")
    print(f"ratio gzip / zstd:chunked: {ratio:.1f}x")
    summary = {c: {n: f.to_json() for n, f in r.items()} for c, r in results.items()}
    print(json.dumps({"podman": version, "results": summary, "ratio": round(ratio, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
