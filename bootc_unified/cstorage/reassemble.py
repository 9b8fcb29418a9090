"""Rebuild a layer's tar stream bit-exactly from its tar-split and its overlay diff/ directory.

Segments are written verbatim; each file entry contributes `size` bytes read from diff/<name>,
checked against the entry's CRC-64/ISO. The whole stream is hashed with sha256 as it is produced:
equal to the layer's DiffID means the store's content is exactly what was pulled.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bootc_unified.errors import UserError
from bootc_unified.verity import Digester

from .store import Layer
from .tarsplit import FileEntry, Segment, TarSplitError, crc64_iso, read_entries

CHUNK = 1 << 20


class Sink(Protocol):
    """Where the tar goes: must take every byte it is given (a buffered file, BytesIO, stdout.buffer)."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...


class LayerContentDamaged(UserError):
    """A layer's diff/ does not hold what its tar-split records (a file missing, of another size or
    type, or the reassembled tar not hashing to the DiffID): what a power cut soon after a pull can
    leave, or tampering."""


class LayerDigestMismatch(LayerContentDamaged):
    """The reassembled tar does not hash to the layer's DiffID."""


@dataclass(frozen=True)
class Reassembly:
    digest: str  # "sha256:<hex>" of the reassembled tar
    size: int  # bytes of tar produced
    files: int  # file entries with content
    file_bytes: int  # content bytes read from diff/


def name_parts(name: bytes) -> list[bytes]:
    """The path components of a tar entry name, cleaned lexically as containers/storage cleans it
    (Go's filepath.Clean): empty and '.' parts dropped (a leading '/' too), 'dir/..' pairs removed;
    a name whose '..' climbs out of the root is refused."""
    parts = (name[:-1] if name.endswith(b"/") else name).split(b"/")
    if b"" not in parts and b"." not in parts and b".." not in parts:  # already clean: most names
        return parts
    parts = []
    for part in name.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if not parts:
                raise ValueError(f"unsafe entry name {name!r}: it climbs out of the root with '..'")
            parts.pop()
            continue
        parts.append(part)
    return parts


def content_path(diff_dir: bytes, name: bytes) -> bytes:
    """diff/<name> for a tar entry name; refuses names that climb out of diff/."""
    parts = name_parts(name)
    if not parts:
        raise ValueError(f"unsafe entry name {name!r}: it names the root")
    if not diff_dir:
        return b"/".join(parts)
    return b"/".join([diff_dir.rstrip(b"/"), *parts])  # os.path.join, without its per-part checks


def entry_content_path(diff_dir: bytes, entry: FileEntry, where: str) -> bytes:
    """content_path() for a tar-split entry, as a TarSplitError naming the entry when unsafe."""
    try:
        return content_path(diff_dir, entry.name)
    except ValueError as e:
        raise TarSplitError(f"{where}: {e}") from e


class StreamHasher:
    """Streams file contents into the hash and the sink with one reusable 1 MiB buffer; checks each
    file's CRC-64 against tar-split unless `check_crc` is off (the importer, which checks the
    DiffID and looks for the file at fault only when that fails: `diagnose`)."""

    def __init__(self, sink: Sink | None, check_crc: bool = True) -> None:
        self.sink = sink
        self.check_crc = check_crc
        self.buf = bytearray(CHUNK)
        self.view = memoryview(self.buf)
        self.sha = hashlib.sha256()
        self.size = 0

    def segment(self, data: bytes) -> None:
        self.sha.update(data)
        if self.sink is not None:
            self.sink.write(data)
        self.size += len(data)

    def file(self, path: bytes, entry: FileEntry, where: str) -> None:
        fd, _st = open_entry(path, entry, where)
        try:
            self.file_fd(fd, os.fsdecode(path), entry, where)
        finally:
            os.close(fd)

    def file_fd(
        self,
        fd: int,
        shown: str,
        entry: FileEntry,
        where: str,
        keep: bytearray | None = None,
        digester: Digester | None = None,
    ) -> None:
        """Stream an opened diff file (from offset 0) into the hash, the CRC-64 check and the sink;
        its bytes are also appended to `keep` and fed to `digester` when given."""
        crc: int | None = None
        check_crc = self.check_crc and entry.crc is not None
        remaining = entry.size
        offset = 0
        sha_update = self.sha.update
        sink = self.sink
        while remaining:
            chunk = self.view[: min(remaining, CHUNK)]
            n = os.preadv(fd, [chunk], offset)
            if n == 0:
                raise LayerContentDamaged(f"{where}: diff file {shown} ended {remaining} bytes early")
            data = chunk[:n]
            sha_update(data)
            if check_crc:
                crc = crc64_iso(data, crc)
            if sink is not None:
                sink.write(data)
            if keep is not None:
                keep += data
            if digester is not None:
                digester.update(data)
            remaining -= n
            offset += n
        if check_crc and (crc if crc is not None else crc64_iso(b"")).to_bytes(8, "big") != entry.crc:
            raise TarSplitError(f"{where}: CRC-64 of diff file {shown} does not match tar-split")
        self.size += entry.size


def open_entry(path: bytes, entry: FileEntry, where: str) -> tuple[int, os.stat_result]:
    """Open the diff file of a tar-split entry read-only (no symlink followed, no FIFO waited on):
    a regular file of the entry's size, or a one-line error naming the entry."""
    shown = os.fsdecode(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LayerContentDamaged(f"{where}: diff file {shown} is missing") from None
    except OSError as e:
        raise UserError(f"{where}: diff file {shown}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise LayerContentDamaged(f"{where}: diff file {shown} is {kind}")
        if st.st_size != entry.size:
            raise LayerContentDamaged(
                f"{where}: diff file {shown} is {st.st_size} bytes, tar-split says {entry.size}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def reassemble_stream(tar_split: Path, diff_dir: Path, label: str, sink: Sink | None) -> Reassembly:
    """Reassemble the tar described by `tar_split` with contents from `diff_dir` into `sink`."""
    if not diff_dir.is_dir():
        raise UserError(f"layer {label}: diff directory {diff_dir} is missing")
    if not tar_split.is_file():
        raise UserError(f"layer {label}: tar-split {tar_split} is missing")
    base = os.fsencode(diff_dir)
    copier = StreamHasher(sink)
    files = file_bytes = 0
    for entry in read_entries(tar_split, label):
        if isinstance(entry, Segment):
            copier.segment(entry.data)
            continue
        if entry.size == 0:
            continue
        where = entry.where(label)
        copier.file(entry_content_path(base, entry, where), entry, where)
        files += 1
        file_bytes += entry.size
    return Reassembly("sha256:" + copier.sha.hexdigest(), copier.size, files, file_bytes)


def diagnose(layer: Layer, digest: str, what: str) -> LayerContentDamaged | TarSplitError:
    """The error for a layer whose `what` hashed to `digest`, not its DiffID: the first diff file
    whose CRC-64, size or type differs from tar-split (found by reading the layer again, with the
    CRC checks), else the DiffID mismatch itself."""
    try:
        reassemble_stream(layer.tar_split_path, layer.diff_path, layer.label, None)
    except (LayerContentDamaged, TarSplitError) as e:
        return e
    return LayerDigestMismatch(f"layer {layer.label}: {what} has digest {digest}, expected the DiffID")


def reassemble(layer: Layer, sink: Sink | None = None, *, verify: bool = True) -> Reassembly:
    """Reassemble `layer` into `sink` (None: only hash it); with `verify`, raise LayerDigestMismatch
    unless the result hashes to the layer's DiffID; a partially pulled layer the store cannot give
    bit-exactly is refused first (PartialLayerError). Hold the store's read lock around this."""
    layer.check_complete()
    result = reassemble_stream(layer.tar_split_path, layer.diff_path, layer.label, sink)
    if verify and result.digest != layer.diff_id:
        raise LayerDigestMismatch(
            f"layer {layer.label}: reassembled tar has digest {result.digest}, expected the DiffID"
        )
    return result
