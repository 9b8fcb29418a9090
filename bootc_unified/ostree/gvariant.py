"""ostree's content checksum, with the GVariant file header serialized by hand.

A content object's checksum (ostree-core.c, `_ostree_file_header_new` + `variant_to_lenprefixed_buffer`)
is SHA-256 over: the header's serialized size as a big-endian u32, four NUL bytes, the GVariant
`(uuuusa(ayay))` = (uid, gid, mode, rdev, symlink target, xattrs) with the four u32 stored
big-endian (GUINT32_TO_BE), rdev always 0, the target "" for a regular file, the xattrs sorted by
name, each name an `ay` bytestring with its NUL; then, for a regular file, its bytes.

GVariant serialization (the GVariant specification): a tuple lays its members out at their
alignment and ends with the end offsets of its variable-size members except the last, in reverse
order; an array of variable-size elements ends with every element's end offset. Offsets are 1, 2, 4
or 8 bytes, the smallest width in which the container's whole size fits.
"""

from __future__ import annotations

import hashlib
import stat
import struct
from collections.abc import Iterable, Mapping

HEADER_PADDING = b"\0\0\0\0"


def _offset_size(size: int) -> int:
    if size == 0:
        return 0
    if size <= 0xFF:
        return 1
    if size <= 0xFFFF:
        return 2
    if size <= 0xFFFFFFFF:
        return 4
    return 8


def _frame(body: bytes, offsets: list[int]) -> bytes:
    """`body` followed by `offsets` (already in serialization order) at the smallest width that fits."""
    if not offsets:
        return body
    for width in (1, 2, 4, 8):
        total = len(body) + width * len(offsets)
        if _offset_size(total) <= width:
            break
    return body + b"".join(o.to_bytes(width, "little") for o in offsets)


def _xattr_entry(name: bytes, value: bytes) -> bytes:
    """`(ayay)`: the name (with its NUL, as g_variant_new_bytestring) then the value; one offset
    (the end of the name) since the first member is variable-size and not last."""
    first = name + b"\0"
    return _frame(first + value, [len(first)])


def serialize_xattrs(xattrs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """`a(ayay)` of (name, value) pairs in the order given (callers sort by name)."""
    body = b""
    ends: list[int] = []
    for name, value in xattrs:
        body += _xattr_entry(name, value)
        ends.append(len(body))
    return _frame(body, ends)


def file_header(uid: int, gid: int, mode: int, target: bytes, xattrs: Mapping[bytes, bytes]) -> bytes:
    """The serialized `(uuuusa(ayay))` file header of a regular file or symlink."""
    if b"\0" in target:
        raise ValueError("a symlink target with a NUL byte")
    fixed = struct.pack(">IIII", uid, gid, mode, 0)
    string = target + b"\0"
    body = fixed + string + serialize_xattrs(sorted(xattrs.items()))
    # one framing offset: the end of the string (the array is the last member)
    return _frame(body, [len(fixed) + len(string)])


def header_prefix(header: bytes) -> bytes:
    """What the checksum hashes before the content: size (u32 BE), 4 NULs, the header."""
    return struct.pack(">I", len(header)) + HEADER_PADDING + header


def content_hasher(
    uid: int, gid: int, mode: int, target: bytes, xattrs: Mapping[bytes, bytes]
) -> hashlib._Hash:
    """A sha256 fed with the header; a regular file's bytes follow, then hexdigest() is the checksum."""
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise ValueError(f"ostree content objects are regular files or symlinks, not mode {mode:o}")
    h = hashlib.sha256()
    h.update(header_prefix(file_header(uid, gid, mode, target, xattrs)))
    return h


def symlink_checksum(uid: int, gid: int, target: bytes, xattrs: Mapping[bytes, bytes]) -> str:
    return content_hasher(uid, gid, stat.S_IFLNK | 0o777, target, xattrs).hexdigest()


def regular_checksum_fd(fd: int, uid: int, gid: int, mode: int, xattrs: Mapping[bytes, bytes]) -> str:
    """The checksum of the regular file open at `fd` (read from offset 0) with the given metadata."""
    import os

    h = content_hasher(uid, gid, stat.S_IFREG | stat.S_IMODE(mode), b"", xattrs)
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()
