"""Read tar-split metadata (`<layer>.tar-split.gz`): gzip of NDJSON entries.

Each line is `{"type":T,"name":S,"name_raw":B64,"size":N,"payload":B64|null,"position":K}`:
type 1 is a file entry (its content lives in the layer's diff/ under `name`; `payload` is the
8-byte big-endian CRC-64/ISO of that content), type 2 is a segment of raw archive bytes (headers,
PAX records, padding, the end-of-archive blocks). Every problem raises TarSplitError naming the
layer and the entry.
"""

from __future__ import annotations

import binascii
import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootc_unified.errors import UserError

FILE_TYPE = 1
SEGMENT_TYPE = 2


class TarSplitError(UserError):
    """The tar-split data of a layer is unreadable or does not match the layer's content."""


def crc64_iso_crcmod() -> Callable[[bytes | bytearray | memoryview, int | None], int]:
    """CRC-64/ISO through crcmod (crcmod's init is the register init XOR xorout, hence 0)."""
    import crcmod  # type: ignore[import-untyped]

    fun = crcmod.mkCrcFun(0x1000000000000001B, rev=True, initCrc=0, xorOut=0xFFFFFFFFFFFFFFFF)

    def crc64(data: bytes | bytearray | memoryview, crc: int | None = None) -> int:
        return int(fun(bytes(data)) if crc is None else fun(bytes(data), crc))

    return crc64


def _select_crc64() -> Callable[[bytes | bytearray | memoryview, int | None], int]:
    """The fastcrc wheel (PyPI, in the venv), else Debian's python3-crcmod (the guest image)."""
    try:
        from fastcrc import crc64
    except ImportError:
        return crc64_iso_crcmod()
    fun: Callable[[bytes | bytearray | memoryview, int | None], int] = crc64.go_iso
    return fun


_crc64 = _select_crc64()


def crc64_iso(data: bytes | bytearray | memoryview, crc: int | None = None) -> int:
    """CRC-64/ISO (GO-ISO): reflected poly 0xD800000000000000, init and xorout all ones.

    Pass the previous result as `crc` to continue a running checksum.
    """
    return int(_crc64(data, crc))


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A file entry: `size` content bytes come from diff/<name>."""

    name: bytes
    size: int
    crc: bytes | None  # 8 bytes, or None when tar-split recorded no checksum
    position: int

    @property
    def display_name(self) -> str:
        return self.name.decode("utf-8", "backslashreplace")

    def where(self, layer: str) -> str:
        """How errors about this entry name it."""
        return f"layer {layer}: tar-split entry {self.position} ({self.display_name})"


@dataclass(frozen=True, slots=True)
class Segment:
    """Raw archive bytes written verbatim."""

    data: bytes
    position: int


Entry = FileEntry | Segment


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a base64 string")
    try:
        return binascii.a2b_base64(value, strict_mode=True)
    except binascii.Error as e:
        raise ValueError(f"{what} is not valid base64 ({e})") from None


# json.loads(bytes) would first guess the encoding of every line: tar-split writes UTF-8 (Go's
# encoding/json), so lines are decoded as json.loads decodes UTF-8 and handed to one decoder.
_decode = json.JSONDecoder().decode


def _parse_line(line: bytes, index: int) -> Entry:
    obj = _decode(line.decode("utf-8", "surrogatepass"))
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    position = obj.get("position", index)
    if not isinstance(position, int):
        raise ValueError("position is not an integer")
    kind = obj.get("type")
    payload = obj.get("payload")
    if kind == SEGMENT_TYPE:
        return Segment(_b64(payload, "payload") if payload is not None else b"", position)
    if kind == FILE_TYPE:
        raw = obj.get("name_raw")
        if raw is not None:
            name = _b64(raw, "name_raw")
        else:
            text = obj.get("name", "")
            if not isinstance(text, str):
                raise ValueError("name is not a string")
            name = text.encode("utf-8", "surrogateescape")
        size = obj.get("size", 0)
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"size {size!r} is not a non-negative integer")
        crc = None
        if payload is not None:
            crc = _b64(payload, "payload")
            if len(crc) != 8:
                raise ValueError(f"payload is {len(crc)} bytes, expected an 8-byte CRC-64")
        return FileEntry(name, size, crc, position)
    raise ValueError(f"unknown entry type {kind!r}")


@contextmanager
def _open_gzip(path: Path, layer: str) -> Iterator[gzip.GzipFile]:
    try:
        raw = path.open("rb")
    except OSError as e:
        raise TarSplitError(f"layer {layer}: tar-split {path}: {e.strerror or e}") from e
    with raw, gzip.GzipFile(fileobj=raw, mode="rb") as f:
        yield f


def read_entries(path: Path, layer: str) -> Iterator[Entry]:
    """Yield the entries of the tar-split file `path` (of layer `layer`) in order."""
    index = 0
    with _open_gzip(path, layer) as f:
        while True:
            try:
                line = f.readline()
            except (OSError, EOFError, zlib.error) as e:
                raise TarSplitError(
                    f"layer {layer}: tar-split {path}: corrupt or truncated gzip after entry {index}: {e}"
                ) from e
            if not line:
                return
            if line.isspace():
                continue
            try:
                entry = _parse_line(line, index)
            except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
                raise TarSplitError(f"layer {layer}: tar-split {path}: entry {index}: {e}") from e
            index += 1
            yield entry
