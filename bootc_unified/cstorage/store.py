"""Open an overlay containers-storage read-only and resolve images to manifest, config and layers.

    store = Store.open(Path("/var/lib/containers/storage"))
    with store.read_lock():
        image = store.image("localhost/app:latest")
        for layer in image.layers:  # bottom to top
            ... layer.diff_id, layer.diff_path, layer.tar_split_path

Nothing here writes to the store or runs podman. The JSON files are read under the store's
shared locks (see locks.py); callers that go on to read layer content keep `read_lock()` held so
a concurrent `podman rmi` cannot remove it underneath them (podman waits meanwhile).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootc_unified.errors import UserError

from .locks import store_read_lock
from .records import ImageRecord, LayerRecord, big_data_filename, load_json_array
from .reference import find_image

IMAGES_JSON = "overlay-images/images.json"
LAYERS_JSON = "overlay-layers/layers.json"
VOLATILE_LAYERS_JSON = "overlay-layers/volatile-layers.json"

_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
_SCHEMA1_TYPES = {
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
}


class PartialLayerError(UserError):
    """A layer pulled partially (zstd:chunked) for which the store lacks its tar-split or DiffID."""


@dataclass(frozen=True)
class Layer:
    """One layer of an image, with where its content and tar-split live."""

    id: str
    diff_id: str  # sha256 of the uncompressed layer tar, from the image config
    size: int | None  # size of the uncompressed tar as the store recorded it
    diff_path: Path
    tar_split_path: Path
    record: LayerRecord = field(repr=False)

    @property
    def label(self) -> str:
        """How errors name this layer."""
        return f"{self.diff_id} (storage layer {self.id[:12]})"

    def partial_gaps(self) -> list[str]:
        """For a layer pulled partially (zstd:chunked), what the store lacks to give its tar
        bit-exactly: the tar-split, and the DiffID recorded as the layer's `diff-digest` and equal
        to the config's. Measured: trixie's podman 5.4 keeps both (the tar-split comes from the
        blob's TOC); Debian 12's podman 4.3 keeps no tar-split and records the compressed digest
        as diff-digest. Empty for a complete partial layer, and for every layer pulled whole
        (their checks come when the tar is read)."""
        if not self.record.partial:
            return []
        gaps = []
        if not self.tar_split_path.is_file():
            gaps.append("its tar-split")
        recorded = self.record.diff_digest
        if recorded is None:
            gaps.append("its DiffID (no diff-digest recorded)")
        elif recorded != self.diff_id:
            gaps.append(f"its DiffID (it records diff-digest {recorded}, not the config's)")
        return gaps

    def check_complete(self) -> None:
        """Raise PartialLayerError, in one line, when `partial_gaps` finds anything."""
        if gaps := self.partial_gaps():
            raise PartialLayerError(
                f"layer {self.label}: pulled partially from a zstd:chunked TOC and the store lacks "
                f"{' and '.join(gaps)}: it cannot be imported bit-exactly (pull it without partial pulls)"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "diff_id": self.diff_id,
            "size": self.size,
            "compressed_digest": self.record.compressed_digest,
            "compressed_size": self.record.compressed_size,
            "toc_digest": self.record.toc_digest,
            "partial": self.record.partial,
            "partial_gaps": self.partial_gaps(),
            "diff_path": str(self.diff_path),
            "tar_split_path": str(self.tar_split_path),
        }


@dataclass(frozen=True)
class Image:
    id: str
    names: tuple[str, ...]
    digest: str | None
    manifest_digest: str
    manifest: dict[str, Any]
    config_digest: str
    config: dict[str, Any]
    layers: tuple[Layer, ...]  # bottom to top
    record: ImageRecord = field(repr=False)

    @property
    def label(self) -> str:
        return self.names[0] if self.names else self.id[:12]

    def layer(self, diff_id: str) -> Layer:
        want = diff_id if diff_id.startswith("sha256:") else "sha256:" + diff_id
        for layer in self.layers:
            if layer.diff_id == want:
                return layer
        raise UserError(f"image {self.label}: no layer with DiffID {diff_id}")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "names": list(self.names),
            "digest": self.digest,
            "manifest_digest": self.manifest_digest,
            "config_digest": self.config_digest,
            "manifest": self.manifest,
            "config": self.config,
            "layers": [layer.to_json() for layer in self.layers],
        }


@dataclass(frozen=True)
class Store:
    root: Path

    @classmethod
    def open(cls, root: Path) -> Store:
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"{root}: no such containers-storage directory")
        for sub in ("overlay-images", "overlay-layers"):
            if not (root / sub).is_dir():
                raise UserError(f"{root}: not an overlay containers-storage (no {sub}/)")
        return cls(root)

    @contextmanager
    def read_lock(self) -> Iterator[None]:
        with store_read_lock(self.root):
            yield

    # --- records (caller holds read_lock) ---------------------------------------------------

    def image_records(self) -> list[ImageRecord]:
        path = self.root / IMAGES_JSON
        return [ImageRecord.from_json(o, str(path)) for o in load_json_array(path, missing_ok=True)]

    def layer_records(self) -> dict[str, LayerRecord]:
        layers: dict[str, LayerRecord] = {}
        for name in (LAYERS_JSON, VOLATILE_LAYERS_JSON):
            path = self.root / name
            for obj in load_json_array(path, missing_ok=True):
                rec = LayerRecord.from_json(obj, str(path))
                layers[rec.id] = rec
        return layers

    def big_data(self, image: ImageRecord, key: str) -> bytes:
        """The big-data item `key` of `image`, checked against its recorded sha256 digest."""
        if key not in image.big_data_names:
            raise UserError(f"image {image.id[:12]}: no big-data item {key!r}")
        path = self.root / "overlay-images" / image.id / big_data_filename(key)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"image {image.id[:12]}: big-data {key!r} at {path}: {e.strerror}") from e
        want = image.big_data_digests.get(key)
        if isinstance(want, str) and want.startswith("sha256:"):
            got = "sha256:" + hashlib.sha256(data).hexdigest()
            if got != want:
                raise UserError(
                    f"image {image.id[:12]}: big-data {key!r} at {path} has digest {got}, expected {want}"
                )
        return data

    def diff_path(self, layer_id: str) -> Path:
        return self.root / "overlay" / layer_id / "diff"

    def tar_split_path(self, layer_id: str) -> Path:
        return self.root / "overlay-layers" / f"{layer_id}.tar-split.gz"

    # --- images ------------------------------------------------------------------------------

    def image(self, ref: str) -> Image:
        """Resolve `ref` (name, digest or ID; see reference.py) under the store's read locks."""
        with self.read_lock():
            record = find_image(self.image_records(), ref)
            return self._build_image(record, self.layer_records())

    def images(self) -> list[ImageRecord]:
        with self.read_lock():
            return self.image_records()

    def _json_big_data(self, record: ImageRecord, key: str) -> dict[str, Any]:
        data = self.big_data(record, key)
        try:
            value = json.loads(data)
        except ValueError as e:
            raise UserError(f"image {record.id[:12]}: big-data {key!r} is not valid JSON ({e})") from e
        if not isinstance(value, dict):
            raise UserError(f"image {record.id[:12]}: big-data {key!r} is not a JSON object")
        return value

    def _select_manifest(self, record: ImageRecord) -> tuple[str, dict[str, Any]]:
        """The image manifest (not an index) and its digest: the one the image record names
        (its `digest`, what podman reports as Digest: the registry's, also after a copy between
        stores that stores a rewritten manifest beside it), else the first image manifest."""
        candidates = ["manifest"] if "manifest" in record.big_data_names else []
        candidates += [k for k in record.big_data_names if k.startswith("manifest-")]
        if record.digest:
            named = [k for k in candidates if k == f"manifest-{record.digest}"]
            named += [k for k in candidates if record.big_data_digests.get(k) == record.digest]
            candidates = list(dict.fromkeys([*named, *candidates]))
        if not candidates:
            raise UserError(f"image {record.id[:12]}: no manifest stored")
        for key in candidates:
            manifest = self._json_big_data(record, key)
            media_type = manifest.get("mediaType")
            if media_type in _SCHEMA1_TYPES or manifest.get("schemaVersion") == 1:
                raise UserError(f"image {record.id[:12]}: docker schema 1 manifests are not supported")
            if media_type in _INDEX_TYPES or "manifests" in manifest:
                continue
            config = manifest.get("config")
            if isinstance(config, dict) and config.get("digest") in record.big_data_names:
                digest = record.big_data_digests.get(key)
                if not isinstance(digest, str):
                    digest = "sha256:" + hashlib.sha256(self.big_data(record, key)).hexdigest()
                return digest, manifest
        raise UserError(f"image {record.id[:12]}: no image manifest whose config is stored with the image")

    def _build_image(self, record: ImageRecord, layers: dict[str, LayerRecord]) -> Image:
        manifest_digest, manifest = self._select_manifest(record)
        config_digest = str(manifest["config"]["digest"])
        config = self._json_big_data(record, config_digest)
        rootfs = config.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
            raise UserError(f"image {record.id[:12]}: config {config_digest} has no rootfs.diff_ids")

        chain: list[LayerRecord] = []
        layer_id = record.top_layer
        while layer_id is not None:
            rec = layers.get(layer_id)
            if rec is None:
                raise UserError(f"image {record.id[:12]}: layer {layer_id} is missing from layers.json")
            if rec.incomplete:
                raise UserError(f"image {record.id[:12]}: layer {layer_id} is incomplete (interrupted pull?)")
            chain.append(rec)
            layer_id = rec.parent
            if len(chain) > len(layers):
                raise UserError(f"image {record.id[:12]}: layer parents form a cycle")
        chain.reverse()

        if len(chain) != len(diff_ids):
            raise UserError(
                f"image {record.id[:12]}: {len(chain)} layers in the store but {len(diff_ids)} "
                f"diff_ids in config {config_digest}"
            )
        result = []
        for rec, diff_id in zip(chain, diff_ids, strict=True):
            # A partial layer's wrong diff-digest is one of its gaps (Layer.partial_gaps), named
            # when something needs its tar; inspecting the image still works.
            if rec.diff_digest is not None and rec.diff_digest != diff_id and not rec.partial:
                raise UserError(
                    f"image {record.id[:12]}: layer {rec.id} has diff-digest {rec.diff_digest}, "
                    f"config says {diff_id}"
                )
            result.append(
                Layer(
                    id=rec.id,
                    diff_id=diff_id,
                    size=rec.diff_size,
                    diff_path=self.diff_path(rec.id),
                    tar_split_path=self.tar_split_path(rec.id),
                    record=rec,
                )
            )
        return Image(
            id=record.id,
            names=record.names,
            digest=record.digest,
            manifest_digest=manifest_digest,
            manifest=manifest,
            config_digest=config_digest,
            config=config,
            layers=tuple(result),
            record=record,
        )
