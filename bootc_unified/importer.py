"""Import an image from a containers-storage into the composefs repository, sharing file data.

For each layer not already present: a splitstream `oci-layer-<diffid>` whose tar headers and padding
are inline and whose file contents over 64 bytes are objects made from the layer's diff/ files
(reflink, else hardlink, else copy); each diff file is read once, for the stream's sha256 (which
must equal the DiffID or nothing is published) and its CRC-64. Then the config stream (named refs:
DiffID -> layer stream, and `composefs.image` -> the EROFS image), the manifest stream (named ref:
config digest -> config stream), and last the ref `streams/refs/oci/<escaped name>`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bootc_unified import faults
from bootc_unified.cstorage import Image, Layer, Segment, Store, read_entries
from bootc_unified.cstorage.reassemble import (
    LayerContentDamaged,
    StreamHasher,
    diagnose,
    entry_content_path,
    open_entry,
)
from bootc_unified.cstorage.tarsplit import FileEntry
from bootc_unified.digestpool import DigestPool, FileDigest
from bootc_unified.erofs.tree import INLINE_MAX  # contents up to this size stay inline
from bootc_unified.errors import UserError
from bootc_unified.gcpause import gc_paused
from bootc_unified.repository import ObjectResult, Repository, escape_ref, splitstream
from bootc_unified.repository.refs import object_id_of
from bootc_unified.repository.stats import ImportStats
from bootc_unified.verity import Digester

# Threads adding objects ahead of the stream with fs-verity (reflink and the kernel's hashing
# release the GIL). On one CPU none: the kernel hashes on the CPU the stream's sha256 needs, and
# threads only hand the GIL back and forth (a 1-vCPU guest spent more time in that than working).
# BOOTC_UNIFIED_IMPORT_WORKERS sets the number (the VM tests run both ways on one vCPU).
_CPUS = len(os.sched_getaffinity(0))
_WORKERS = os.environ.get("BOOTC_UNIFIED_IMPORT_WORKERS", "")
IMPORT_WORKERS = int(_WORKERS) if _WORKERS.isdigit() else min(4, _CPUS + 1) if _CPUS > 1 else 0
# Below this many bytes of large files, worker processes cost more to start than they save.
DIGEST_POOL_MIN_BYTES = 32 << 20
IMAGE_REF = "composefs.image"


def layer_content_id(diff_id: str) -> str:
    return f"oci-layer-{diff_id}"


def config_content_id(digest: str) -> str:
    return f"oci-config-{digest}"


def manifest_content_id(digest: str) -> str:
    return f"oci-manifest-{digest}"


def image_ref_name(name: str) -> str:
    return f"oci/{escape_ref(name)}"


@dataclass
class ImportResult:
    image: str  # the name or reference imported
    manifest_digest: str
    config_digest: str
    layers_imported: int = 0
    layers_present: int = 0
    stats: ImportStats = field(default_factory=ImportStats)
    image_id: str | None = None  # the EROFS image, when one was built

    def to_json(self) -> dict[str, object]:
        return {
            "image": self.image,
            "manifest_digest": self.manifest_digest,
            "config_digest": self.config_digest,
            "layers": {"imported": self.layers_imported, "present": self.layers_present},
            "objects": self.stats.to_json(),
            "image_id": self.image_id,
        }


def import_layer(repo: Repository, layer: Layer, stats: ImportStats, zerocopy: bool) -> str:
    """Write the layer's splitstream (verified against its DiffID) and return the stream's object ID.

    Each diff file is opened and read once, in stream order, for the sha256 of the tar stream (the
    DiffID check) and its inline bytes (small files); on a DiffID mismatch the layer is read again
    with tar-split's CRC-64s to name the file at fault. Large files
    become objects: in an insecure repository from that same fd, named by a userspace digest that
    worker processes compute ahead (a DigestPool; in this thread for a small layer); with fs-verity
    by a few threads running ahead (on one CPU, from that same fd), the kernel hashing in the ioctls.
    """
    label = layer.label
    layer.check_complete()
    if not layer.diff_path.is_dir():
        raise UserError(f"layer {label}: diff directory {layer.diff_path} is missing")
    base = os.fsencode(layer.diff_path)
    items: list[Segment | tuple[FileEntry, bytes, str]] = []
    large: list[tuple[bytes, int]] = []
    for entry in read_entries(layer.tar_split_path, label):
        if isinstance(entry, Segment):
            items.append(entry)
            continue
        if entry.size == 0:
            continue
        where = entry.where(label)
        path = entry_content_path(base, entry, where)
        items.append((entry, path, where))
        if entry.size > INLINE_MAX:
            large.append((path, entry.size))

    writer = splitstream.Writer(repo.alg, splitstream.OCI_LAYER)
    # The DiffID check covers every byte; tar-split's per-file CRC-64s only name the file at fault,
    # so they are computed only when the DiffID does not match (CRC-64 in the guest, through
    # Debian's crcmod, costs four times the sha256).
    hasher = StreamHasher(None, check_crc=False)
    if repo.insecure:
        # Objects named before they are added: whether each exists comes from one listing of the
        # repository's objects where the layer has enough of them to pay for it.
        with repo.objects.listed(len(large)):
            if sum(size for _, size in large) >= DIGEST_POOL_MIN_BYTES:
                with DigestPool(repo.alg) as digests:
                    _stream_insecure(repo, items, digests.map(large), writer, hasher, stats, zerocopy)
            else:
                _stream_insecure(repo, items, None, writer, hasher, stats, zerocopy)
    else:
        _stream_verity(repo, items, large, writer, hasher, stats, zerocopy)
    digest = "sha256:" + hasher.sha.hexdigest()
    if digest != layer.diff_id:  # which file is at fault, when tar-split's CRCs can tell
        raise diagnose(layer, digest, "imported tar stream")
    faults.point("import-layer-before-publish")
    return repo.write_stream(layer_content_id(layer.diff_id), writer.finish())


def _stream_insecure(
    repo: Repository,
    items: list[Segment | tuple[FileEntry, bytes, str]],
    digests: Iterator[FileDigest | None] | None,
    writer: splitstream.Writer,
    hasher: StreamHasher,
    stats: ImportStats,
    zerocopy: bool,
) -> None:
    """The stream in order, every object added from the fd its bytes were just hashed from; object
    IDs from `digests` (one per large file, in order), else digested here from the same buffers."""
    for item in items:
        if isinstance(item, Segment):
            writer.write_inline(item.data)
            hasher.segment(item.data)
            continue
        entry, path, where = item
        shown = os.fsdecode(path)
        fd, st = open_entry(path, entry, where)
        try:
            if entry.size <= INLINE_MAX:
                data = bytearray()
                hasher.file_fd(fd, shown, entry, where, keep=data)
                writer.write_inline(data)
            else:
                pooled = next(digests) if digests is not None else None
                digester = Digester(repo.alg) if digests is None else None
                hasher.file_fd(fd, shown, entry, where, digester=digester)
                digest = pooled
                if digester is not None:
                    digest = FileDigest(
                        digester.finish(), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
                    )
                try:
                    result = repo.objects.ensure_object_from_fd(fd, st, path, zerocopy, digest)
                except UserError as e:
                    raise UserError(f"{where}: {e}") from e
                stats.record(result)
                writer.write_external(result.object_id, entry.size)
        finally:
            os.close(fd)
        faults.point("import-layer-entry")


def _stream_verity(
    repo: Repository,
    items: list[Segment | tuple[FileEntry, bytes, str]],
    large: list[tuple[bytes, int]],
    writer: splitstream.Writer,
    hasher: StreamHasher,
    stats: ImportStats,
    zerocopy: bool,
) -> None:
    """The stream in order; objects added by a small thread pool running ahead (reflink and the
    kernel's verity hashing release the GIL), or on one CPU here, from the fd just hashed."""
    pool = ThreadPoolExecutor(max_workers=IMPORT_WORKERS) if IMPORT_WORKERS else None
    try:
        added = None if pool is None else pool.map(lambda item: _add_object(repo, item[0], zerocopy), large)
        for item in items:
            if isinstance(item, Segment):
                writer.write_inline(item.data)
                hasher.segment(item.data)
                continue
            entry, path, where = item
            fd, st = open_entry(path, entry, where)
            try:
                if entry.size <= INLINE_MAX:
                    data = bytearray()
                    hasher.file_fd(fd, os.fsdecode(path), entry, where, keep=data)
                    writer.write_inline(data)
                else:
                    hasher.file_fd(fd, os.fsdecode(path), entry, where)
                    try:
                        if added is None:
                            result = repo.objects.ensure_object_from_fd(fd, st, path, zerocopy)
                        else:
                            result = next(added)
                    except UserError as e:
                        raise UserError(f"{where}: {e}") from e
                    if result.size != entry.size:
                        raise LayerContentDamaged(
                            f"{where}: diff file is {result.size} bytes, tar-split says {entry.size}"
                        )
                    stats.record(result)
                    writer.write_external(result.object_id, entry.size)
            finally:
                os.close(fd)
            faults.point("import-layer-entry")
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # on an error, add no further objects


def _add_object(repo: Repository, path: bytes, zerocopy: bool) -> ObjectResult:
    return repo.ensure_object_from_file(path, zerocopy=zerocopy)


def raw_manifest(store: Store, image: Image) -> bytes:
    """The manifest exactly as stored (its sha256 is the manifest digest)."""
    names = image.record.big_data_names
    for key in (f"manifest-{image.manifest_digest}", "manifest"):
        if key in names:
            data = store.big_data(image.record, key)
            if "sha256:" + hashlib.sha256(data).hexdigest() == image.manifest_digest:
                return data
    raise UserError(f"image {image.label}: the manifest {image.manifest_digest} is not stored")


BuildImage = Callable[[Repository, list[tuple[str, str]]], str]


def create_image(repo: Repository, layers: list[tuple[str, str]]) -> str:
    """Flatten (DiffID, layer stream) pairs into a tree, write its EROFS image; returns the image ID."""
    from bootc_unified.erofs import TreeError, write_image
    from bootc_unified.layertree import flattened

    try:
        with gc_paused(), flattened(repo, layers) as root:
            data = write_image(root, repo.alg)
    except TreeError as e:
        raise UserError(f"image of layers {', '.join(d for d, _ in layers)}: {e}") from e
    faults.point("create-image-before-store")
    return repo.write_image(data)


def import_image(
    repo: Repository,
    store: Store,
    ref: str,
    zerocopy: bool = False,
    build_image: BuildImage | None = create_image,
    name: str | None = None,
) -> ImportResult:
    """Import `ref` from `store` under the ref name `name` (default: `ref`); `build_image` makes the
    EROFS image from the (DiffID, layer stream) pairs (None: no image)."""
    with store.read_lock():
        image = store.image(ref)
        config = store.big_data(image.record, image.config_digest)
        manifest = raw_manifest(store, image)
        result = ImportResult(ref, image.manifest_digest, image.config_digest)
        repo.recover()  # what an interrupted earlier write left
        with repo.writer_lock():
            # Every layer still to import must be whole before any is: a partially pulled one the
            # store lacks a tar-split or DiffID for is refused up front, with nothing written.
            for layer in image.layers:
                if repo.has_stream(layer_content_id(layer.diff_id)) is None:
                    layer.check_complete()
            with repo.transaction():
                layer_streams = _import_layers(repo, image, result, zerocopy, build_image)
                publish(
                    repo,
                    name or ref,
                    config,
                    image.config_digest,
                    manifest,
                    image.manifest_digest,
                    layer_streams,
                    result.image_id,
                )
    return result


def _import_layers(
    repo: Repository, image: Image, result: ImportResult, zerocopy: bool, build_image: BuildImage | None
) -> list[tuple[str, str]]:
    """The layers not yet in the repository (their streams), then the EROFS image; returns the
    (DiffID, layer stream) pairs."""
    layer_streams: list[tuple[str, str]] = []
    for layer in image.layers:
        present = repo.has_stream(layer_content_id(layer.diff_id))
        if present is not None:
            result.layers_present += 1
            layer_streams.append((layer.diff_id, present))
            continue
        layer_streams.append((layer.diff_id, import_layer(repo, layer, result.stats, zerocopy)))
        result.layers_imported += 1
    if build_image is not None:
        result.image_id = build_image(repo, layer_streams)
    return layer_streams


def publish(
    repo: Repository,
    name: str,
    config: bytes,
    config_digest: str,
    manifest: bytes,
    manifest_digest: str,
    layer_streams: list[tuple[str, str]],
    image_id: str | None,
) -> None:
    """Write the config and manifest streams, then (last) the image's refs."""
    cw = splitstream.Writer(repo.alg, splitstream.OCI_CONFIG)
    cw.write_inline(config)
    for diff_id, stream_id in layer_streams:
        if not cw.has_named_ref(diff_id):  # an image may list the same layer twice
            cw.add_named_ref(diff_id, stream_id)
    if image_id is not None:
        cw.add_named_ref(IMAGE_REF, image_id)
    config_id = repo.write_stream(config_content_id(config_digest), cw.finish())
    faults.point("import-after-config")
    mw = splitstream.Writer(repo.alg, splitstream.OCI_MANIFEST)
    mw.write_inline(manifest)
    mw.add_named_ref(config_digest, config_id)
    repo.write_stream(manifest_content_id(manifest_digest), mw.finish())
    faults.point("import-after-manifest")
    if image_id is not None:
        repo.set_image_ref(image_ref_name(name), image_id)
    repo.set_stream_ref(image_ref_name(name), manifest_content_id(manifest_digest))
    faults.point("import-after-ref")


@dataclass(frozen=True)
class StoredImage:
    """An imported image as the repository holds it, found from its ref."""

    name: str
    manifest_digest: str
    config_digest: str
    config: bytes
    manifest: bytes
    layers: list[tuple[str, str]]  # (DiffID, layer stream object ID), bottom to top
    image_id: str | None


def stored_image(repo: Repository, name: str) -> StoredImage:
    """Resolve streams/refs/oci/<name> -> manifest stream -> config stream -> layer streams."""
    ref = repo.path / "streams" / "refs" / image_ref_name(name)
    manifest_id = object_id_of(ref, repo.objects.dir)
    if manifest_id is None:
        raise UserError(f"{repo.path}: no image named {name!r} (see ls-refs)")
    manifest_stream = repo.open_stream_object(manifest_id, splitstream.OCI_MANIFEST, name)
    return image_of_manifest_stream(repo, manifest_stream, name, repr(name))


def image_of_manifest_stream(
    repo: Repository,
    manifest_stream: splitstream.SplitStream,
    name: str,
    label: str,
    manifest_digest: str | None = None,
) -> StoredImage:
    """Manifest stream -> config stream -> layer streams, each checked: the manifest hashes to
    `manifest_digest` (when given), the config to the digest the manifest names, and the config
    names a layer stream for every DiffID. Errors are one line naming `label`."""
    manifest = b"".join(repo.cat_stream(manifest_stream))
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    if manifest_digest is not None and digest != manifest_digest:
        raise UserError(f"{repo.path}: the manifest stream of {label} does not hash to its digest")
    if len(manifest_stream.named_refs) != 1:
        raise UserError(f"{repo.path}: the manifest stream of {label} does not name exactly one config")
    [(config_digest, config_id)] = manifest_stream.named_refs.items()
    config_stream = repo.open_stream_object(config_id, splitstream.OCI_CONFIG, config_digest)
    config = b"".join(repo.cat_stream(config_stream))
    if "sha256:" + hashlib.sha256(config).hexdigest() != config_digest:
        raise UserError(f"{repo.path}: the config stream of {label} does not hash to {config_digest}")
    try:
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{repo.path}: config {config_digest} of {label} has no rootfs.diff_ids") from e
    layers = []
    for diff_id in diff_ids:
        stream_id = config_stream.named_refs.get(diff_id)
        if stream_id is None:
            raise UserError(f"{repo.path}: config {config_digest} has no layer stream for {diff_id}")
        layers.append((str(diff_id), stream_id))
    return StoredImage(
        name,
        digest,
        config_digest,
        config,
        manifest,
        layers,
        config_stream.named_refs.get(IMAGE_REF),
    )


def recreate_image(repo: Repository, name: str) -> str:
    """Build the EROFS image of an imported image again and republish its streams and refs."""
    with repo.writer_lock():
        image = stored_image(repo, name)
        image_id = create_image(repo, image.layers)
        publish(
            repo,
            name,
            image.config,
            image.config_digest,
            image.manifest,
            image.manifest_digest,
            image.layers,
            image_id,
        )
    return image_id
