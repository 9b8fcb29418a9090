"""Put an image the repository holds back into a containers-storage, bit-exactly, with no registry.

The repository keeps each imported image's manifest and config (inline in their streams) and one
splitstream per layer that reproduces the layer tar exactly (its sha256 is the DiffID). It cannot
reproduce the registry's compressed blobs, whose digests the manifest names. So:

1. an OCI layout in `workdir` (on the target store's filesystem): the config as it was, each layer
   tar rebuilt from its splitstream as an uncompressed blob (sha256 checked against the DiffID while
   it is written), and a manifest naming those;
2. `podman pull oci:` of it into a scratch containers-storage in `workdir`: the same config, so the
   same image ID and the same layers (layer IDs chain the DiffIDs); the layout is removed then;
3. the original manifest attached to the scratch image as its manifest: the one hand edit, of a
   big-data file and its images.json record, in a store no other process knows, under its lock;
4. `podman image push` from the scratch store into the target store by image ID: c/image copies
   each layer from its diff (re-verifying the DiffID), stores the uncompressed variant of the
   manifest beside the original and names the image by the original manifest's digest - what a copy
   from a store that pulled the image from the registry gives (`ImageStore.copy_from_host`).

Nothing is left in `workdir`; on failure the target store is as it was, except that an image pushed
before the failure is the caller's to remove (`rebuild` returns only after a complete push).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bootc_unified import faults
from bootc_unified.cstorage.records import big_data_filename
from bootc_unified.errors import UserError, tool_error_line
from bootc_unified.imgstore import PODMAN, ImageStore
from bootc_unified.importer import image_of_manifest_stream, manifest_content_id
from bootc_unified.progress import NullProgress, Progress, ProgressSteps
from bootc_unified.repository import Repository, splitstream

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
CHUNK = 1 << 20


@dataclass(frozen=True)
class RepoImage:
    """An image as the repository holds it, found by its manifest digest."""

    manifest_digest: str
    manifest: bytes
    config_digest: str
    config: bytes
    layers: tuple[tuple[str, str], ...]  # (DiffID, layer stream object ID), bottom to top

    @property
    def diff_ids(self) -> list[str]:
        return [d for d, _ in self.layers]


def repo_image(repo: Repository, manifest_digest: str) -> RepoImage:
    """Manifest stream `oci-manifest-<digest>` -> config stream -> layer streams (UserError if any
    is missing or inconsistent)."""
    label = f"image {manifest_digest}"
    if repo.has_stream(manifest_content_id(manifest_digest)) is None:
        raise UserError(f"{repo.path}: {label} is not in the repository (no manifest stream)")
    mstream = repo.open_stream(manifest_content_id(manifest_digest), splitstream.OCI_MANIFEST)
    stored = image_of_manifest_stream(repo, mstream, "", label, manifest_digest)
    layers = tuple(stored.layers)
    return RepoImage(manifest_digest, stored.manifest, stored.config_digest, stored.config, layers)


def write_layer_tar(repo: Repository, diff_id: str, stream_id: str, dest: Path) -> int:
    """Write the layer tar of a splitstream to `dest`; its sha256 must be `diff_id`. Returns its size."""
    stream = repo.open_stream_object(stream_id, splitstream.OCI_LAYER, diff_id)
    sha = hashlib.sha256()
    size = 0
    with open(dest, "wb") as out:
        for chunk in stream.chunks():
            if isinstance(chunk, bytes):
                out.write(chunk)
                sha.update(chunk)
                size += len(chunk)
                continue
            try:
                f = open(repo.objects.path_of(chunk), "rb")  # noqa: SIM115 (closed below)
            except FileNotFoundError:
                raise UserError(f"{repo.path}: object {chunk} of layer {diff_id} is missing") from None
            with f:
                while data := f.read(CHUNK):
                    out.write(data)
                    sha.update(data)
                    size += len(data)
    if "sha256:" + sha.hexdigest() != diff_id:
        raise UserError(f"layer {diff_id}: the repository's stream rebuilds to sha256:{sha.hexdigest()}")
    return size


def write_oci_layout(repo: Repository, image: RepoImage, layout: Path, progress: Progress) -> None:
    """An OCI layout at `layout` holding `image` with uncompressed layers (see the module docstring)."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (blobs / image.config_digest.removeprefix("sha256:")).write_bytes(image.config)
    descriptors = []
    sizes: dict[str, int] = {}
    total = len(image.layers)
    for n, (diff_id, stream_id) in enumerate(image.layers):
        progress.send(ProgressSteps("rebuilding", "Rebuilding layers", diff_id, steps=n, steps_total=total))
        if diff_id not in sizes:
            tmp = blobs / f".{n}.tmp"
            sizes[diff_id] = write_layer_tar(repo, diff_id, stream_id, tmp)
            os.rename(tmp, blobs / diff_id.removeprefix("sha256:"))
        descriptors.append({"mediaType": OCI_LAYER_TAR, "digest": diff_id, "size": sizes[diff_id]})
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": image.config_digest, "size": len(image.config)},
        "layers": descriptors,
    }
    data = json.dumps(manifest).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest.removeprefix("sha256:")).write_bytes(data)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest, "size": len(data)}],
    }
    (layout / "index.json").write_text(json.dumps(index))
    progress.send(
        ProgressSteps(
            "rebuilding", "Rebuilding layers", image.manifest_digest, steps=total, steps_total=total
        ),
        True,
    )


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.rename(tmp, path)


def attach_manifest(store_root: Path, image_id: str, manifest: bytes, digest: str) -> None:
    """Make `manifest` the manifest of image `image_id` (big data "manifest" and "manifest-<digest>",
    the record's digest) in a store no other process uses, under its images.lock."""
    lock = os.open(store_root / "overlay-images" / "images.lock", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        path = store_root / "overlay-images" / "images.json"
        records = json.loads(path.read_bytes())
        [record] = [r for r in records if r.get("id") == image_id]
        for key in ("manifest", f"manifest-{digest}"):
            _write_atomic(store_root / "overlay-images" / image_id / big_data_filename(key), manifest)
            if key not in record.setdefault("big-data-names", []):
                record["big-data-names"].append(key)
            record.setdefault("big-data-sizes", {})[key] = len(manifest)
            record.setdefault("big-data-digests", {})[key] = digest
        record["digest"] = digest
        record["digests"] = list(dict.fromkeys([digest, *(record.get("digests") or [])]))
        _write_atomic(path, json.dumps(records).encode())
    finally:
        os.close(lock)  # releases the lock


def push_by_id(source: ImageStore, image_id: str, target: ImageStore) -> None:
    """`podman image push` from one store to another, the destination named by ID only."""
    target.env()  # writes the target's pinned configuration (its runroot directory too)
    dest = (
        f"containers-storage:[overlay@{target.root}+{target.runroot}:overlay.skip_mount_home=true]@{image_id}"
    )
    argv = [PODMAN, "--root", str(source.root), "--runroot", str(source.runroot)]
    argv += ["--storage-driver", "overlay", "--storage-opt", "overlay.skip_mount_home=true"]
    argv += ["image", "push", "--quiet", image_id, dest]
    proc = subprocess.run(argv, capture_output=True, text=True, env=source.env())
    if proc.returncode != 0:
        why = tool_error_line(proc.stderr)
        raise UserError(f"cannot copy image {image_id[:12]} into {target.root}: {why}")


def rebuild(
    repo: Repository, image: RepoImage, target: ImageStore, workdir: Path, progress: Progress | None = None
) -> str:
    """Put `image` into `target` from the repository alone; returns its image ID there."""
    progress = progress or NullProgress()
    image_id = image.config_digest.removeprefix("sha256:")
    workdir.mkdir(parents=True)
    scratch = ImageStore(workdir / "storage")
    try:
        layout = workdir / "oci"
        write_oci_layout(repo, image, layout, progress)
        # podman names an image pulled from `oci:PATH` localhost/PATH, so PATH must be a valid
        # reference: relative, from inside workdir.
        proc = subprocess.run(
            scratch.argv(["pull", "--quiet", "oci:oci"]),
            capture_output=True,
            text=True,
            env=scratch.env(),
            cwd=workdir,
        )
        if proc.returncode != 0:
            raise UserError(
                f"image {image.manifest_digest}: loading the rebuilt layers: {tool_error_line(proc.stderr)}"
            )
        loaded = proc.stdout.strip().splitlines()[-1]
        if loaded != image_id:
            raise UserError(f"image {image.manifest_digest}: rebuilt as image {loaded}, expected {image_id}")
        shutil.rmtree(layout)
        attach_manifest(scratch.root, image_id, image.manifest, image.manifest_digest)
        progress.send(ProgressSteps("copying", "Copying into the bootc store", image_id, steps_total=1), True)
        push_by_id(scratch, image_id, target)
        faults.point("rebuild-after-push")
        progress.send(
            ProgressSteps("copying", "Copying into the bootc store", image_id, steps=1, steps_total=1), True
        )
    finally:
        scratch.cleanup_runtime()
        shutil.rmtree(workdir, ignore_errors=True)
    return image_id
