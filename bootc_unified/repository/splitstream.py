"""Splitstreams: a byte stream (a layer tar, a JSON config) whose large parts are external objects.

Layout (little-endian), as composefs-rs writes it:

    header (32 bytes)  magic "SplitStream", version 0, flags u16, algorithm u8, lg_blocksize 12,
                       info FileRange{start u64, end u64}
    info (80 bytes)    stream_refs, object_refs, stream, named_refs (FileRanges),
                       content_type u64, stream_size u64
    stream_refs        raw digests of referenced splitstreams (and images)
    object_refs        raw digests of external objects, deduplicated, in first-use order
    stream             one zstd frame of chunks: i64 -n then n inline bytes; i64 k >= 0 = object_refs[k]
    named_refs         one zstd frame of "idx:name\\0" records, sorted by name

The splitstream is itself an object; `streams/<content-id>` links to it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import zstandard

from bootc_unified.verity import HashAlg

MAGIC = b"SplitStream"
HEADER = struct.Struct("<11sBHBBQQ")
INFO = struct.Struct("<QQQQQQQQQQ")
CHUNK = struct.Struct("<q")
_COMPRESS_BATCH = 1 << 20


def content_type(tag: bytes) -> int:
    """An 8-character ASCII tag as the little-endian u64 stored in the info section."""
    assert len(tag) == 8
    return int.from_bytes(tag, "little")


OCI_LAYER = content_type(b"ocilayer")
OCI_CONFIG = content_type(b"ociconfg")
OCI_MANIFEST = content_type(b"ocimanif")
OCI_BLOB = content_type(b"oci_blob")


class SplitStreamError(ValueError):
    """A splitstream that cannot be parsed; the message says what is wrong."""


class Writer:
    """Builds a splitstream in memory (inline data is small once file contents are external)."""

    def __init__(self, alg: HashAlg, content_type: int) -> None:
        self.alg = alg
        self.content_type = content_type
        self._compressor = zstandard.ZstdCompressor(level=3).compressobj()
        self._frames: list[bytes] = []
        self._raw = bytearray()  # chunk records not yet compressed
        self._inline = bytearray()
        self._object_refs: list[bytes] = []
        self._object_index: dict[bytes, int] = {}
        self._stream_refs: list[bytes] = []
        self._stream_index: dict[bytes, int] = {}
        self._named: dict[str, int] = {}
        self.size = 0

    def write_inline(self, data: bytes | bytearray | memoryview) -> None:
        self._inline += data
        self.size += len(data)

    def write_external(self, object_id: str, size: int) -> None:
        raw = bytes.fromhex(object_id)
        self._flush_inline()
        index = self._object_index.get(raw)
        if index is None:
            index = self._object_index[raw] = len(self._object_refs)
            self._object_refs.append(raw)
        self._emit(CHUNK.pack(index))
        self.size += size

    def has_named_ref(self, name: str) -> bool:
        return name in self._named

    def add_named_ref(self, name: str, stream_id: str) -> None:
        if "\0" in name or name in self._named:
            raise ValueError(f"bad or duplicate named ref {name!r}")
        raw = bytes.fromhex(stream_id)
        index = self._stream_index.get(raw)
        if index is None:
            index = self._stream_index[raw] = len(self._stream_refs)
            self._stream_refs.append(raw)
        self._named[name] = index

    def _emit(self, data: bytes | bytearray) -> None:
        # Chunks are gathered and compressed a megabyte at a time: one compress call per chunk (two
        # per file of a layer) cost more than the compression itself.
        self._raw += data
        if len(self._raw) >= _COMPRESS_BATCH:
            self._compress()

    def _compress(self) -> None:
        out = self._compressor.compress(bytes(self._raw))
        self._raw.clear()
        if out:
            self._frames.append(out)

    def _flush_inline(self) -> None:
        if self._inline:
            self._emit(CHUNK.pack(-len(self._inline)))
            self._emit(self._inline)
            self._inline = bytearray()

    def finish(self) -> bytes:
        self._flush_inline()
        self._compress()
        self._frames.append(self._compressor.flush())
        stream = b"".join(self._frames)
        named = b"".join(f"{i}:{n}\0".encode() for n, i in sorted(self._named.items()))
        named_z = zstandard.ZstdCompressor(level=3).compress(named) if named else b""
        offset = HEADER.size + INFO.size
        sections = []
        for blob in (b"".join(self._stream_refs), b"".join(self._object_refs), stream, named_z):
            sections.append((offset, offset + len(blob)))
            offset += len(blob)
        info = INFO.pack(*(v for rng in sections for v in rng), self.content_type, self.size)
        header = HEADER.pack(MAGIC, 0, 0, self.alg.kernel_id, 12, HEADER.size, HEADER.size + INFO.size)
        return b"".join(
            [header, info, b"".join(self._stream_refs), b"".join(self._object_refs), stream, named_z]
        )


@dataclass
class SplitStream:
    """A parsed splitstream: its references, and its chunks on demand."""

    alg: HashAlg
    content_type: int
    size: int
    stream_refs: list[str]
    object_refs: list[str]
    named_refs: dict[str, str]
    _stream: bytes = field(repr=False)

    def chunks(self) -> Iterator[bytes | str]:
        """Inline data as bytes, external content as the object ID (hex str)."""
        data = zstandard.ZstdDecompressor().decompressobj().decompress(self._stream) if self._stream else b""
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if pos + CHUNK.size > len(view):
                raise SplitStreamError("truncated chunk header in stream")
            (n,) = CHUNK.unpack_from(view, pos)
            pos += CHUNK.size
            if n < 0:
                end = pos - n
                if end > len(view):
                    raise SplitStreamError("inline chunk runs past the end of the stream")
                yield bytes(view[pos:end])
                pos = end
            else:
                if n >= len(self.object_refs):
                    raise SplitStreamError(f"chunk refers to object {n} of {len(self.object_refs)}")
                yield self.object_refs[n]


def parse(data: bytes, expected_type: int | None = None) -> SplitStream:
    if len(data) < HEADER.size:
        raise SplitStreamError("shorter than a splitstream header")
    magic, version, _flags, alg_id, lg_block, info_start, info_end = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise SplitStreamError("bad magic (not a splitstream)")
    if version != 0 or lg_block != 12:
        raise SplitStreamError(f"unsupported version {version} / block size 2^{lg_block}")
    try:
        alg = HashAlg.from_kernel_id(alg_id)
    except ValueError as e:
        raise SplitStreamError(str(e)) from e
    if info_end - info_start < INFO.size or info_end > len(data):
        raise SplitStreamError("info section out of range")
    values = INFO.unpack_from(data, info_start)
    ranges = [(values[i], values[i + 1]) for i in range(0, 8, 2)]
    ctype, size = values[8], values[9]
    if expected_type is not None and ctype != expected_type:
        raise SplitStreamError(f"content type {ctype:#x}, expected {expected_type:#x}")
    for start, end in ranges:
        if not start <= end <= len(data):
            raise SplitStreamError("section out of range")
    (s_refs, o_refs, stream, named) = (data[a:b] for a, b in ranges)
    for blob in (s_refs, o_refs):
        if len(blob) % alg.size:
            raise SplitStreamError("reference array is not a whole number of digests")
    stream_refs = [s_refs[i : i + alg.size].hex() for i in range(0, len(s_refs), alg.size)]
    object_refs = [o_refs[i : i + alg.size].hex() for i in range(0, len(o_refs), alg.size)]
    named_refs: dict[str, str] = {}
    if named:
        try:
            text = zstandard.ZstdDecompressor().decompressobj().decompress(named).decode()
        except (zstandard.ZstdError, UnicodeDecodeError) as e:
            raise SplitStreamError(f"named refs: {e}") from e
        for record in text.split("\0")[:-1]:
            idx, sep, name = record.partition(":")
            if not sep or not idx.isdigit() or int(idx) >= len(stream_refs):
                raise SplitStreamError(f"bad named ref record {record!r}")
            named_refs[name] = stream_refs[int(idx)]
    return SplitStream(alg, ctype, size, stream_refs, object_refs, named_refs, stream)
