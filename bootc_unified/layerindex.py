"""The tar members of a layer stream (headers parsed, content inline or as an object reference),
and their cache, kept so that building an image does not parse every layer's tar headers again: an
upgrade whose image adds one layer parses that one layer only.

`<repo>/cache/layers/<stream object ID>`: a magic line, the SHA-256 of the payload, then the
payload: zstd of the `marshal` of (DiffID, members as tuples with object IDs as digest bytes),
about 70 bytes per member (the SHA-512 digest most of it). Derived data only: a file that is
missing, torn by a crash, of another format, or made for another layer is a miss (the layer is
parsed from its stream again and the file rewritten), never an error. Written under a temporary
name and renamed into place without an fsync (a torn file fails its checksum); GC removes the
files of the streams it removes (repository.gc.prune_layer_cache). The directory is inside the
repository.
"""

from __future__ import annotations

import hashlib
import marshal
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import zstandard

from bootc_unified import cachefile
from bootc_unified.cstorage.tarheader import (
    BLOCK,
    HeaderError,
    kind_of,
    parse_header,
    parse_number,
    parse_plain,
)
from bootc_unified.erofs.tree import INLINE_MAX
from bootc_unified.repository import LAYER_CACHE, Repository, splitstream

MAGIC = b"bootc-unified layer members 1\n"
_DIGEST = 32
_EXTENSION_TYPES = (b"x", b"g", b"L", b"K")
_ZERO_BLOCK = bytes(BLOCK)


class Member(NamedTuple):
    """One tar member as flattening needs it: the header's final values (PAX and GNU records
    applied) and the content. A plain tuple, so that layerindex stores it as is."""

    name: bytes
    typeflag: bytes
    mode: int  # permission bits (& 0o7777)
    uid: int
    gid: int
    size: int
    mtime: int
    mtime_nsec: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes]
    data: bytes | None  # inline content (regular files of at most 64 bytes)
    object_id: str | None  # external content

    @property
    def kind(self) -> str:
        return kind_of(self.typeflag)


class _ChunkReader:
    """Reads inline bytes and external references from splitstream chunks, in stream order."""

    def __init__(self, chunks: Iterable[bytes | str]) -> None:
        self._chunks = iter(chunks)
        self._buf = bytearray()
        self._pos = 0
        self._external: str | None = None

    def _fill(self) -> bool:
        if self._external is not None:
            return False
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        if isinstance(chunk, str):
            self._external = chunk
            return False
        if self._pos > 1 << 20:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += chunk
        return True

    def read(self, n: int) -> bytes | None:
        """Exactly n inline bytes; None at the very end of the stream; error if cut short."""
        while len(self._buf) - self._pos < n:
            if not self._fill():
                if self._pos == len(self._buf) and self._external is None:
                    return None
                raise HeaderError("stream ends or reaches file content in the middle of a tar header")
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return out

    def read_external(self) -> str:
        if self._pos == len(self._buf) and self._external is None:
            self._fill()
        if self._pos != len(self._buf) or self._external is None:
            raise HeaderError("expected an object reference for file content")
        object_id, self._external = self._external, None
        return object_id


def tar_members(chunks: Iterable[bytes | str]) -> Iterator[Member]:
    """The members of a layer tar stored as a splitstream, with their content or object reference."""
    reader = _ChunkReader(chunks)
    global_pax: dict[str, bytes] = {}
    while True:
        block = reader.read(BLOCK)
        if block is None or block == _ZERO_BLOCK:
            return
        plain = None if global_pax or block[156:157] in _EXTENSION_TYPES else parse_plain(block)
        if plain is not None:  # most members: one header block, parsed on the fast path
            name, typeflag, mode, uid, gid, size, mtime, linkname, devmajor, devminor = plain
            mtime_nsec, xattrs = 0, {}
        else:
            chain = bytearray(block)
            while block[156:157] in _EXTENSION_TYPES:
                extension = parse_number(block[124:136])
                payload = reader.read(-(-extension // BLOCK) * BLOCK)
                block = reader.read(BLOCK)
                if payload is None or block is None:
                    raise HeaderError("stream ends inside an extended header")
                chain += payload + block
            h = parse_header(bytes(chain), global_pax)
            name, typeflag, mode, uid, gid, size, mtime, mtime_nsec = (
                h.name, h.typeflag, h.mode, h.uid, h.gid, h.size, h.mtime, h.mtime_nsec,
            )  # fmt: skip
            linkname, devmajor, devminor, xattrs = h.linkname, h.devmajor, h.devminor, h.xattrs
        data: bytes | None = None
        object_id: str | None = None
        is_file = kind_of(typeflag) == "file"
        if is_file and size > 0:
            if size > INLINE_MAX:
                object_id = reader.read_external()
            else:
                data = reader.read(size)
                if data is None:
                    raise HeaderError("stream ends inside file content")
        padding = -size % BLOCK if is_file else 0
        if padding and reader.read(padding) is None:
            raise HeaderError("stream ends inside file padding")
        yield Member(
            name, typeflag, mode, uid, gid, size, mtime, mtime_nsec, linkname, devmajor, devminor, xattrs,
            data, object_id,
        )  # fmt: skip


def layer_members(repo: Repository, diff_id: str, stream_id: str) -> list[Member]:
    """The members of layer `diff_id` stored as stream object `stream_id`: from the cache when it
    holds them, else parsed from the stream (and kept)."""
    members = load(repo.path, stream_id, diff_id)
    if members is None:
        stream = repo.open_stream_object(stream_id, splitstream.OCI_LAYER, diff_id)
        members = list(tar_members(stream.chunks()))
        store(repo.path, stream_id, diff_id, members)
    return members


def _path(repo_path: Path, stream_id: str) -> Path:
    return repo_path / LAYER_CACHE / stream_id


def load(repo_path: Path, stream_id: str, diff_id: str) -> list[Member] | None:
    """The members of layer stream `stream_id`, or None when no intact file for it exists."""
    try:
        raw = _path(repo_path, stream_id).read_bytes()
    except OSError:
        return None
    head = len(MAGIC) + _DIGEST
    if raw[: len(MAGIC)] != MAGIC or hashlib.sha256(raw[head:]).digest() != raw[len(MAGIC) : head]:
        return None
    try:
        stored_diff_id, records = marshal.loads(zstandard.ZstdDecompressor().decompress(raw[head:]))
        if stored_diff_id != diff_id:
            return None
        return [Member._make((*r[:-1], None if r[-1] is None else r[-1].hex())) for r in records]
    except (ValueError, TypeError, EOFError, zstandard.ZstdError):
        return None


def store(repo_path: Path, stream_id: str, diff_id: str, members: list[Member]) -> None:
    """Keep `members` for `stream_id`; a repository that cannot take the file just has no cache."""
    # Object IDs as their digest bytes (half the size of hex); zstd shrinks the names and headers.
    try:
        records = [(*m[:-1], None if m.object_id is None else bytes.fromhex(m.object_id)) for m in members]
    except ValueError:  # not a hex object ID: nothing to cache (flattening will say what is wrong)
        return
    payload = zstandard.ZstdCompressor(level=1).compress(marshal.dumps((diff_id, records), 4))
    cachefile.write(repo_path / LAYER_CACHE, stream_id, MAGIC + hashlib.sha256(payload).digest() + payload)
