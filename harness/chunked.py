"""An update v1 -> v2 for measuring zstd:chunked partial pulls against gzip, and what a pull fetched.

Both images are one layer built with buildah from definitions in code (harness.testimages' Entry and
ImageDef, so `expected_tree` is the oracle of their content): v1 holds FILES files of FILE_SIZE
incompressible bytes under usr/lib/update/; v2 is rebuilt from scratch (a new layer, as when a base
image is rebuilt) with CHANGED of those files given new content and ADDED new files. A gzip pull of
v1 -> v2 fetches the whole new layer; a zstd:chunked partial pull needs only the new contents
((CHANGED + ADDED) * FILE_SIZE) plus the layer's TOC and tar-split.

`fetched(registry, since)` is the oracle of what a pull cost: the body bytes the registry's access
log says it sent (harness.registry, started with `access_log=True`), not anything podman reports.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from harness.registry import Registry
from harness.run import run
from harness.testimages import Buildah, Entry, Expected, ImageDef, build_image, expected_tree, fetch_manifest

REPOSITORY = "bootc-unified-test/update"
FILES = 48
FILE_SIZE = 96 * 1024
CHANGED = 2
ADDED = 1
ZSTD_CHUNKED = "zstd:chunked"
LAYER_MEDIA_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    ZSTD_CHUNKED: "application/vnd.oci.image.layer.v1.tar+zstd",
}
# The TOC annotation of each zstd:chunked format: containers-storage >= 1.46 (with a tar-split in
# the blob; what trixie's podman 5.4 writes) and the first one (no tar-split; Debian 12's 4.3).
TOC_ANNOTATIONS = {
    "io.github.containers.zstd-chunked.manifest-checksum": "tar-split",
    "io.containers.zstd-chunked.manifest-checksum": "no tar-split",
}


@dataclass(frozen=True)
class SeededEntry(Entry):
    """An Entry whose content is seeded by path and `seed`: the same path, other bytes."""

    seed: bytes = b""

    def content(self) -> bytes:
        return random.Random(self.path + self.seed).randbytes(self.size)


def _file(index: int, seed: bytes = b"") -> Entry:
    return SeededEntry("file", f"usr/lib/update/f{index:03d}".encode(), FILE_SIZE, seed=seed)


def update_defs() -> dict[str, ImageDef]:
    """upd-v1 and upd-v2 (see the module docstring); the version file differs too."""
    v1 = [_file(i) for i in range(FILES)]
    v2 = [_file(i, b"v2" if i < CHANGED else b"") for i in range(FILES + ADDED)]
    version = {
        name: SeededEntry("file", b"usr/lib/update/version", 32, seed=name.encode())
        for name in ("upd-v1", "upd-v2")
    }
    return {
        "upd-v1": ImageDef("upd-v1", "the update's v1", [[*v1, version["upd-v1"]]]),
        "upd-v2": ImageDef("upd-v2", "v1 rebuilt with changed and added files", [[*v2, version["upd-v2"]]]),
    }


def new_content_bytes() -> int:
    """What an ideal partial pull of v1 -> v2 fetches: the contents v1 does not have."""
    return (CHANGED + ADDED) * FILE_SIZE + 32


def tag(name: str) -> str:
    return name.removeprefix("upd-")


def repository(compression: str) -> str:
    return f"{REPOSITORY}-{compression.replace(':', '-')}"


@dataclass(frozen=True)
class UpdateImages:
    registry_address: str
    refs: dict[tuple[str, str], str]  # (name, compression) -> host reference
    layer_sizes: dict[tuple[str, str], int]  # compressed size of the image's layer blob
    expected: dict[str, dict[bytes, Expected]] = field(repr=False)  # name -> the oracle's tree

    def ref(self, name: str, compression: str = "gzip") -> str:
        return self.refs[(name, compression)]


def push_layout(b: Buildah, name: str, registry_address: str, compression: str) -> tuple[str, int]:
    """Compress `localhost/<name>` into an OCI layout with buildah, copy it verbatim with skopeo
    (no blob substitution between compressions); return the reference and the layer's size."""
    layout = b.workdir / "layouts" / f"{name}-{compression.replace(':', '-')}"
    layout.parent.mkdir(exist_ok=True)
    ref = f"{registry_address}/{repository(compression)}:{tag(name)}"
    image = f"localhost/{name}:latest"
    b(
        "push",
        "--quiet",
        "--format",
        "oci",
        "--compression-format",
        compression,
        image,
        f"oci:{layout}:latest",
    )
    copy = ["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false"]
    run([*copy, f"oci:{layout}:latest", f"docker://{ref}"], env=b.env)
    manifest = fetch_manifest(registry_address, repository(compression), tag(name))
    layers = manifest["layers"]
    assert isinstance(layers, list) and len(layers) == 1, manifest
    if layers[0]["mediaType"] != LAYER_MEDIA_TYPES[compression]:
        raise RuntimeError(
            f"{ref}: pushed with {compression} but the registry holds {layers[0]['mediaType']}"
        )
    return ref, int(layers[0]["size"])


def build_and_push(
    registry_address: str, workdir: Path, compressions: tuple[str, ...] = ("gzip",)
) -> UpdateImages:
    """Build upd-v1 and upd-v2 and push each with every compression in `compressions`."""
    defs = update_defs()
    b = Buildah(workdir)
    refs, sizes = {}, {}
    try:
        for image in defs.values():
            build_image(b, image)
            for compression in compressions:
                key = (image.name, compression)
                refs[key], sizes[key] = push_layout(b, image.name, registry_address, compression)
    finally:
        b.close()
    expected = {name: expected_tree(defs, name) for name in defs}
    return UpdateImages(registry_address, refs, sizes, expected)


@dataclass(frozen=True)
class Fetched:
    """What the registry sent between two points of its access log."""

    blob_bytes: int  # body bytes of blob GETs (layers and configs; ranges included)
    total_bytes: int  # body bytes of every request (manifests, /v2/ pings too)
    blob_requests: int
    range_requests: int  # 206 answers: a partial pull's range reads

    def to_json(self) -> dict[str, int]:
        return {
            "blob_bytes": self.blob_bytes,
            "total_bytes": self.total_bytes,
            "blob_requests": self.blob_requests,
            "range_requests": self.range_requests,
        }


def fetched(registry: Registry, since: int) -> Fetched:
    """Bytes the registry sent after log offset `since` (take it with `registry.log_offset()`)."""
    requests = registry.requests(since)
    blobs = [r for r in requests if r.blob is not None]
    return Fetched(
        blob_bytes=sum(r.bytes for r in blobs),
        total_bytes=sum(r.bytes for r in requests),
        blob_requests=len(blobs),
        range_requests=sum(1 for r in blobs if r.status == 206),
    )
