"""Walk a layer's tar entries from tar-split (headers) and diff/ (content), verifying the DiffID.

    with store.read_lock():
        for entry in walk_layer(layer):
            entry.path, entry.header.mode, entry.header.xattrs, entry.content, entry.whiteout, ...

Headers (owner, mode, times, xattrs, link targets, device numbers) come from the raw tar headers kept
in tar-split, never from stat() of diff/ (whose owners/modes may be remapped). Whiteouts are taken from
the headers in both forms a layer tar can carry them: an OCI `.wh.NAME` entry, or an overlay-style
character device 0/0 at NAME; `.wh..wh..opq` marks its directory opaque. (In diff/ itself the overlay
driver stores whiteouts as 0/0 devices, fuse-overlayfs setups as `.wh.` files: the walk does not depend
on either.)

With `verify` (the default) every content file is read once, checked against its CRC-64 and hashed
together with the header bytes; when the walk completes, the sha256 must equal the DiffID or
LayerDigestMismatch is raised. Consumers that stop early get no verdict.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from .reassemble import LayerDigestMismatch, StreamHasher, content_path, name_parts
from .store import Layer
from .tarheader import BLOCK, CHARDEV, HeaderError, TarHeader, parse_header
from .tarsplit import Segment, TarSplitError, read_entries

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"


@dataclass(frozen=True)
class LayerEntry:
    header: TarHeader
    path: bytes  # normalized: no leading "./" or "/", no trailing "/"; b"." for the root
    whiteout: bool = False  # removes `path` from the layers below
    opaque: bool = False  # `path` is a directory whose lower contents are hidden
    content: bytes | None = None  # diff/ file holding the content (regular files with size > 0)

    @property
    def kind(self) -> str:
        return self.header.kind


def normalize(name: bytes) -> bytes:
    return b"/".join(name_parts(name)) or b"."


def classify(header: TarHeader, path: bytes) -> tuple[bytes, bool, bool]:
    """(target path, whiteout, opaque) for an entry at normalized `path`."""
    parent, _, base = path.rpartition(b"/")
    if base == OPAQUE_MARKER:
        return parent or b".", False, True
    if base.startswith(WHITEOUT_PREFIX):
        target = base[len(WHITEOUT_PREFIX) :]
        return (parent + b"/" + target) if parent else target, True, False
    if header.typeflag == CHARDEV and header.devmajor == 0 and header.devminor == 0:
        return path, True, False
    return path, False, False


def walk_layer(layer: Layer, *, verify: bool = True) -> Iterator[LayerEntry]:
    label = layer.label
    layer.check_complete()
    if not layer.diff_path.is_dir():
        raise TarSplitError(f"layer {label}: diff directory {layer.diff_path} is missing")
    base = os.fsencode(layer.diff_path)
    copier = StreamHasher(None) if verify else None
    pending = bytearray()
    padding = 0  # bytes of the previous member's content padding at the start of `pending`
    global_pax: dict[str, bytes] = {}
    for item in read_entries(layer.tar_split_path, label):
        if isinstance(item, Segment):
            pending += item.data
            if copier is not None:
                copier.segment(item.data)
            continue
        where = item.where(label)
        try:
            if len(pending) < padding:
                raise HeaderError("segment shorter than the previous member's padding")
            header = parse_header(bytes(pending[padding:]), global_pax)
            if header.name != item.name:
                raise HeaderError(f"tar header names {header.name!r}")
            if header.size != item.size and header.kind == "file":
                raise HeaderError(f"tar header says {header.size} bytes, tar-split {item.size}")
            path, whiteout, opaque = classify(header, normalize(item.name))
            source = content_path(base, item.name) if item.size > 0 else None
        except ValueError as e:  # HeaderError is a ValueError
            raise TarSplitError(f"{where}: {e}") from e
        if source is not None and copier is not None:
            copier.file(source, item, where)
        pending.clear()
        padding = -item.size % BLOCK
        yield LayerEntry(header, path, whiteout, opaque, source)
    if copier is not None:
        digest = "sha256:" + copier.sha.hexdigest()
        if digest != layer.diff_id:
            raise LayerDigestMismatch(f"layer {label}: tar stream has digest {digest}, expected the DiffID")
