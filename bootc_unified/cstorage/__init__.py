"""Read-only access to an overlay containers-storage: images, layers, tar-split, bit-exact layer tars.

No podman involved: images.json / layers.json are read under the store's shared fcntl locks, layer
tars are rebuilt from tar-split + diff/ and checked against the DiffID.
"""

from .reassemble import LayerDigestMismatch, Reassembly, reassemble
from .reference import ImageNotFound
from .store import Image, Layer, Store
from .tarsplit import FileEntry, Segment, TarSplitError, crc64_iso, read_entries

__all__ = [
    "FileEntry",
    "Image",
    "ImageNotFound",
    "Layer",
    "LayerDigestMismatch",
    "Reassembly",
    "Segment",
    "Store",
    "TarSplitError",
    "crc64_iso",
    "read_entries",
    "reassemble",
]
