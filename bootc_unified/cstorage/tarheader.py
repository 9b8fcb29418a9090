"""Parse the raw tar header blocks that tar-split keeps in its segments (ustar, GNU and PAX).

One member's header is a chain of 512-byte blocks: optional PAX extended headers ('x', and global
'g' ones that apply to every later member), optional GNU long name/link records ('L'/'K'), then the
member's own header. Precedence for the final values: PAX record > GNU long record > header field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

BLOCK = 512

REGULAR = (b"0", b"\0", b"7")
HARDLINK = b"1"
SYMLINK = b"2"
CHARDEV = b"3"
BLOCKDEV = b"4"
DIRECTORY = b"5"
FIFO = b"6"

_KINDS = {
    b"0": "file",
    b"\0": "file",
    b"7": "file",
    HARDLINK: "hardlink",
    SYMLINK: "symlink",
    CHARDEV: "char",
    BLOCKDEV: "block",
    DIRECTORY: "dir",
    FIFO: "fifo",
}


class HeaderError(ValueError):
    pass


@dataclass(frozen=True)
class TarHeader:
    name: bytes
    typeflag: bytes
    mode: int  # permission bits with setuid/setgid/sticky (& 0o7777)
    uid: int
    gid: int
    size: int
    mtime: int  # seconds
    mtime_nsec: int
    linkname: bytes
    uname: bytes
    gname: bytes
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes] = field(default_factory=dict)  # from PAX SCHILY.xattr.*
    pax: dict[str, bytes] = field(default_factory=dict, repr=False)  # every PAX record in force

    @property
    def kind(self) -> str:
        """file, hardlink, symlink, char, block, dir or fifo."""
        return kind_of(self.typeflag)


def kind_of(typeflag: bytes) -> str:
    """The entry type a typeflag names: file, hardlink, symlink, char, block, dir or fifo."""
    try:
        return _KINDS[typeflag]
    except KeyError:
        raise HeaderError(f"unsupported tar entry type {typeflag!r}") from None


def _cstr(field_bytes: bytes) -> bytes:
    end = field_bytes.find(b"\0")
    return field_bytes if end < 0 else field_bytes[:end]


def parse_number(field_bytes: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the top bit of the first byte is set."""
    if field_bytes and field_bytes[0] & 0x80:
        value = int.from_bytes(bytes([field_bytes[0] & 0x7F]) + field_bytes[1:], "big")
        if field_bytes[0] & 0x40:  # negative (two's complement)
            value -= 1 << (8 * len(field_bytes) - 1)
        return value
    text = _cstr(field_bytes).strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise HeaderError(f"bad numeric field {field_bytes!r}") from None


def parse_pax(data: bytes) -> dict[str, bytes]:
    """PAX records "LEN KEY=VALUE\\n"; keys are UTF-8, values stay bytes."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding after the last record
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise HeaderError("bad PAX record: no length")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise HeaderError(f"bad PAX record length {data[pos:space]!r}") from None
        record = data[pos : pos + length]
        if length <= space - pos + 1 or len(record) != length or not record.endswith(b"\n"):
            raise HeaderError("bad PAX record: truncated")
        key, eq, value = record[space - pos + 1 : -1].partition(b"=")
        if not eq:
            raise HeaderError("bad PAX record: no '='")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return records


_ASCII = bytes(range(128))


def _checksum_ok(block: bytes) -> bool:
    """The stored checksum is the sum of the block's bytes (the field itself as spaces), unsigned or,
    as some old tars wrote it, signed."""
    field = block[148:156]
    want = parse_number(field)
    unsigned = sum(block) - sum(field) + 8 * 0x20
    if want == unsigned:
        return True
    # bytes over 127 (the field, as spaces, has none) each count 256 less when signed
    high = len(block.translate(None, _ASCII)) - len(field.translate(None, _ASCII))
    return want == unsigned - 256 * high


def _pax_int(pax: dict[str, bytes], key: str, default: int) -> int:
    if key not in pax:
        return default
    try:
        return int(pax[key])
    except ValueError:
        raise HeaderError(f"bad PAX {key} {pax[key]!r}") from None


def _pax_time(pax: dict[str, bytes], seconds: int) -> tuple[int, int]:
    raw = pax.get("mtime")
    if raw is None:
        return seconds, 0
    whole, _, frac = raw.partition(b".")
    try:
        secs = int(whole)
        nsec = int((frac + b"000000000")[:9]) if frac else 0
    except ValueError:
        raise HeaderError(f"bad PAX mtime {raw!r}") from None
    if secs < 0 and nsec:  # "-1.5" is 1.5 s before the epoch
        secs, nsec = secs - 1, 1_000_000_000 - nsec
    return secs, nsec


# One header block with the fields a plain member needs; version, uname and gname skipped.
_PLAIN = struct.Struct("100s8s8s8s12s12s8sc100s6s2x32x32x8s8s155s12x")

# name, typeflag, mode, uid, gid, size, mtime, linkname, devmajor, devminor
PlainHeader = tuple[bytes, bytes, int, int, int, int, int, bytes, int, int]


def parse_plain(block: bytes) -> PlainHeader | None:
    """The common member header, fast: one ustar or GNU block (no PAX or GNU records in force, which
    the caller knows), every number octal text. None when anything is out of the ordinary; then
    parse_header decides, with its errors. Where both parse a block, they agree: a number is read
    here only when nothing but NULs and spaces follows it, so cutting at the first NUL (as
    parse_number does) leaves the same digits."""
    try:
        name, mode, uid, gid, size, mtime, chksum, typeflag, link, magic, major, minor, prefix = (
            _PLAIN.unpack(block)
        )
        if int(chksum.rstrip(b"\0 ") or b"0", 8) != sum(block) - sum(chksum) + 8 * 0x20:
            return None  # bad, or a signed sum: parse_header tells which
        name = name[: name.find(b"\0")] if b"\0" in name else name
        if magic == b"ustar\0" and prefix[:1] != b"\0":
            prefix = prefix[: prefix.find(b"\0")] if b"\0" in prefix else prefix
            name = prefix + b"/" + name
        return (
            name,
            typeflag,
            int(mode.rstrip(b"\0 ") or b"0", 8) & 0o7777,
            int(uid.rstrip(b"\0 ") or b"0", 8),
            int(gid.rstrip(b"\0 ") or b"0", 8),
            int(size.rstrip(b"\0 ") or b"0", 8),
            int(mtime.rstrip(b"\0 ") or b"0", 8),
            link[: link.find(b"\0")] if b"\0" in link else link,
            int(major.rstrip(b"\0 ") or b"0", 8),
            int(minor.rstrip(b"\0 ") or b"0", 8),
        )
    except ValueError:  # base-256 numbers, stray bytes: the general parser's case
        return None


def parse_header(data: bytes, global_pax: dict[str, bytes]) -> TarHeader:
    """Parse one member's chain of header blocks. `global_pax` is updated by 'g' records (pass the
    same dict for every member of a layer)."""
    if len(data) % BLOCK:
        raise HeaderError(f"header data is {len(data)} bytes, not whole 512-byte blocks")
    local: dict[str, bytes] = {}
    long_name: bytes | None = None
    long_link: bytes | None = None
    pos = 0
    while True:
        block = data[pos : pos + BLOCK]
        if len(block) < BLOCK:
            raise HeaderError("header chain ends without a member header")
        if not _checksum_ok(block):
            raise HeaderError(f"bad header checksum at offset {pos}")
        typeflag = block[156:157]
        size = parse_number(block[124:136])
        if typeflag in (b"x", b"g", b"L", b"K"):
            payload = data[pos + BLOCK : pos + BLOCK + size]
            if len(payload) != size:
                raise HeaderError(f"extended header {typeflag.decode()} is truncated")
            if typeflag == b"x":
                local.update(parse_pax(payload))
            elif typeflag == b"g":
                global_pax.update(parse_pax(payload))
            elif typeflag == b"L":
                long_name = _cstr(payload)
            else:
                long_link = _cstr(payload)
            pos += BLOCK + -(-size // BLOCK) * BLOCK
            continue
        pos += BLOCK
        if pos != len(data):
            raise HeaderError(f"{len(data) - pos} unexpected bytes after the member header")
        break

    pax = {**global_pax, **local}
    name = _cstr(block[0:100])
    magic = block[257:263]
    if magic == b"ustar\0":
        prefix = _cstr(block[345:500])
        if prefix:
            name = prefix + b"/" + name
    if long_name is not None:
        name = long_name
    linkname = long_link if long_link is not None else _cstr(block[157:257])
    mtime, mtime_nsec = _pax_time(pax, parse_number(block[136:148]))
    return TarHeader(
        name=pax.get("path", name),
        typeflag=typeflag,
        mode=parse_number(block[100:108]) & 0o7777,
        uid=_pax_int(pax, "uid", parse_number(block[108:116])),
        gid=_pax_int(pax, "gid", parse_number(block[116:124])),
        size=_pax_int(pax, "size", size),
        mtime=mtime,
        mtime_nsec=mtime_nsec,
        linkname=pax.get("linkpath", linkname),
        uname=pax.get("uname", _cstr(block[265:297])),
        gname=pax.get("gname", _cstr(block[297:329])),
        devmajor=parse_number(block[329:337]),
        devminor=parse_number(block[337:345]),
        xattrs={k[len("SCHILY.xattr.") :]: v for k, v in pax.items() if k.startswith("SCHILY.xattr.")},
        pax=pax,
    )
