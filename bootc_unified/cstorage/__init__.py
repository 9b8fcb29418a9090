"""Read-only access to an overlay containers-storage: images, layers, tar-split, bit-exact layer tars.

No podman involved: images.json / layers.json are read under the store's shared fcntl locks, layer
tars are rebuilt from tar-split + diff/ and checked against the DiffID (`reassemble`), or walked
entry by entry with headers from tar-split and content paths in diff/ (`walk_layer`).
"""

from .reassemble import LayerContentDamaged, LayerDigestMismatch, Reassembly, reassemble
from .reference import ImageNotFound
from .store import Image, Layer, PartialLayerError, Store
from .tarheader import TarHeader
from .tarsplit import FileEntry, Segment, TarSplitError, crc64_iso, read_entries
from .walk import LayerEntry, walk_layer

__all__ = [
    "FileEntry",
    "Image",
    "ImageNotFound",
    "Layer",
    "LayerContentDamaged",
    "LayerDigestMismatch",
    "LayerEntry",
    "PartialLayerError",
    "Reassembly",
    "Segment",
    "Store",
    "TarHeader",
    "TarSplitError",
    "crc64_iso",
    "read_entries",
    "reassemble",
    "walk_layer",
]
