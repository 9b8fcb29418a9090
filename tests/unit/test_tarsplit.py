"""tar-split reading and reassembly against independent oracles: published CRC-64/ISO check values, a
checksum taken from a real containers-storage tar-split, and tars written by Python's tarfile."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from bootc_unified.cstorage.reassemble import content_path, reassemble_stream
from bootc_unified.cstorage.tarsplit import FileEntry, Segment, TarSplitError, crc64_iso, read_entries
from bootc_unified.errors import UserError

# --- CRC-64/ISO -------------------------------------------------------------------------------


def test_crc64_iso_check_value() -> None:
    # The catalogue check value of CRC-64/GO-ISO over "123456789".
    assert crc64_iso(b"123456789") == 0xB90956C775A41001


def test_crc64_iso_empty_is_zero() -> None:
    assert crc64_iso(b"") == 0


def test_crc64_iso_matches_real_tar_split_payload() -> None:
    # payload podman's containers/storage wrote for a 12-byte file "hello world\n"
    assert crc64_iso(b"hello world\n").to_bytes(8, "big") == base64.b64decode("ROnPP1cq2aw=")


def test_crc64_iso_streams() -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    running = None
    for i in range(0, len(data), 1 << 20):
        running = crc64_iso(data[i : i + (1 << 20)], running)
    assert running == crc64_iso(data)


# --- helpers: a tar-split writer for tars made by tarfile ------------------------------------


def split_tar(tar: bytes) -> list[dict[str, Any]]:
    """Disassemble `tar` the way tar-split does: raw bytes as segments, member contents as file entries."""
    entries: list[dict[str, Any]] = []
    pos = 0
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:", encoding="utf-8", errors="surrogateescape") as tf:
        for m in tf.getmembers():
            entries.append({"type": 2, "payload": base64.b64encode(tar[pos : m.offset_data]).decode()})
            name = m.name.encode("utf-8", "surrogateescape") + (b"/" if m.isdir() else b"")
            entry: dict[str, Any] = {"type": 1, "size": m.size if m.isreg() else 0, "payload": None}
            try:
                entry["name"] = name.decode("utf-8")
            except UnicodeDecodeError:
                entry["name_raw"] = base64.b64encode(name).decode()
            if m.isreg():
                content = tar[m.offset_data : m.offset_data + m.size]
                entry["payload"] = base64.b64encode(crc64_iso(content).to_bytes(8, "big")).decode()
                pos = m.offset_data + m.size
            else:
                pos = m.offset_data
            entries.append(entry)
    entries.append({"type": 2, "payload": base64.b64encode(tar[pos:]).decode()})
    for i, e in enumerate(entries):
        e["position"] = i
    return entries


def write_tar_split(path: Path, entries: list[dict[str, Any]]) -> Path:
    with gzip.open(path, "wb") as f:
        for e in entries:
            f.write(json.dumps(e).encode() + b"\n")
    return path


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, errors="surrogateescape") as tf:
        for name, data in files.items():
            if name.endswith("/"):
                ti = tarfile.TarInfo(name.rstrip("/"))
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
                continue
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def extract_to(diff: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = diff / os.fsencode(name).decode("utf-8", "surrogateescape")
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


FILES = {
    "d/": b"",
    "d/empty": b"",
    "d/one": b"1",
    "d/block": b"b" * 512,
    "d/odd": os.urandom(70_001),
    "d/" + "n" * 150: b"long name",
    "d/bad\udcffname": b"not utf-8",
}


@pytest.fixture
def layer(tmp_path: Path) -> tuple[bytes, Path, Path]:
    tar = make_tar(FILES)
    diff = tmp_path / "diff"
    extract_to(diff, FILES)
    ts = write_tar_split(tmp_path / "layer.tar-split.gz", split_tar(tar))
    return tar, ts, diff


# --- parsing ----------------------------------------------------------------------------------


def test_read_entries_parses_files_and_segments(layer: tuple[bytes, Path, Path]) -> None:
    tar, ts, _ = layer
    entries = list(read_entries(ts, "L"))
    files = [e for e in entries if isinstance(e, FileEntry)]
    assert [f.name for f in files] == [os.fsencode(n) for n in FILES]
    assert b"d/bad\xffname" in [f.name for f in files]
    assert sum(len(e.data) for e in entries if isinstance(e, Segment)) + sum(f.size for f in files) == len(
        tar
    )
    assert [e.position for e in entries] == list(range(len(entries)))


def test_reassembly_is_bit_exact(layer: tuple[bytes, Path, Path]) -> None:
    tar, ts, diff = layer
    out = io.BytesIO()
    result = reassemble_stream(ts, diff, "L", out)
    assert out.getvalue() == tar
    assert result.digest == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert result.size == len(tar)
    assert result.files == sum(1 for n, d in FILES.items() if d)


def _corrupt_entry(ts: Path, index: int, **changes: Any) -> None:
    with gzip.open(ts, "rb") as f:
        lines = f.read().splitlines()
    obj = json.loads(lines[index])
    obj.update(changes)
    lines[index] = json.dumps(obj).encode()
    with gzip.open(ts, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")


def _file_index(ts: Path, name: str) -> int:
    with gzip.open(ts, "rb") as f:
        for i, line in enumerate(f):
            if json.loads(line).get("name") == name:
                return i
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"payload": "@@not base64@@"}, "not valid base64"),
        ({"payload": base64.b64encode(b"123").decode()}, "expected an 8-byte CRC-64"),
        ({"type": 7}, "unknown entry type 7"),
        ({"size": -1}, "non-negative"),
        ({"name_raw": "!!"}, "name_raw is not valid base64"),
    ],
)
def test_bad_entries_name_layer_and_entry(
    layer: tuple[bytes, Path, Path], change: dict[str, Any], message: str
) -> None:
    _, ts, diff = layer
    index = _file_index(ts, "d/odd")
    _corrupt_entry(ts, index, **change)
    with pytest.raises(TarSplitError) as e:
        reassemble_stream(ts, diff, "LAYER-X", None)
    text = str(e.value)
    assert "LAYER-X" in text and f"entry {index}" in text and message in text
    assert "\n" not in text


def test_crc_mismatch_names_the_file(layer: tuple[bytes, Path, Path]) -> None:
    _, ts, diff = layer
    data = bytearray((diff / "d/odd").read_bytes())
    data[1000] ^= 1
    (diff / "d/odd").write_bytes(bytes(data))
    with pytest.raises(
        TarSplitError, match=r"LAYER-X: tar-split entry \d+ \(d/odd\): CRC-64 of diff file .*d/odd"
    ):
        reassemble_stream(ts, diff, "LAYER-X", None)


def test_truncated_gzip(layer: tuple[bytes, Path, Path]) -> None:
    _, ts, diff = layer
    data = ts.read_bytes()
    ts.write_bytes(data[: len(data) // 2])
    with pytest.raises(TarSplitError, match=r"LAYER-X: tar-split .*: corrupt or truncated gzip after entry"):
        reassemble_stream(ts, diff, "LAYER-X", None)


def test_not_gzip(tmp_path: Path) -> None:
    ts = tmp_path / "x.tar-split.gz"
    ts.write_bytes(b'{"type":2,"payload":null,"position":0}\n')
    with pytest.raises(TarSplitError, match="corrupt or truncated gzip"):
        list(read_entries(ts, "L"))


def test_invalid_json(tmp_path: Path) -> None:
    ts = tmp_path / "x.tar-split.gz"
    ts.write_bytes(gzip.compress(b'{"type":2,"payload":null,"position":0}\n{"type":1,\n'))
    with pytest.raises(TarSplitError, match=r"L: tar-split .*: entry 1: "):
        list(read_entries(ts, "L"))


def test_missing_and_resized_diff_files(layer: tuple[bytes, Path, Path]) -> None:
    _, ts, diff = layer
    (diff / "d/one").write_bytes(b"12")
    with pytest.raises(UserError, match=r"diff file .*d/one is 2 bytes, tar-split says 1"):
        reassemble_stream(ts, diff, "L", None)
    (diff / "d/one").unlink()
    with pytest.raises(UserError, match=r"diff file .*d/one is missing"):
        reassemble_stream(ts, diff, "L", None)


def test_symlinked_diff_file_is_refused(layer: tuple[bytes, Path, Path], tmp_path: Path) -> None:
    _, ts, diff = layer
    (tmp_path / "elsewhere").write_bytes(b"1")
    (diff / "d/one").unlink()
    (diff / "d/one").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match=r"diff file .*d/one: "):
        reassemble_stream(ts, diff, "L", None)


@pytest.mark.parametrize("name", [b"../etc/passwd", b"a/../../x", b"/", b"./"])
def test_content_path_refuses_escapes(name: bytes) -> None:
    with pytest.raises(ValueError):
        content_path(b"/diff", name)


def test_content_path_normalizes() -> None:
    assert content_path(b"/diff", b"./a//b/") == b"/diff/a/b"
    assert content_path(b"/diff", b"/abs/x") == b"/diff/abs/x"


# --- raw tar headers --------------------------------------------------------------------------


def _members(fmt: int, build: list[tarfile.TarInfo], pax: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=fmt, pax_headers=pax or {}, errors="surrogateescape"
    ) as tf:
        for ti in build:
            tf.addfile(ti, io.BytesIO(b"z" * ti.size) if ti.isreg() else None)
    return buf.getvalue()


def _ti(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, **kw: Any) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mtime = kind, size, 1_700_000_000
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


HEADER_CASES = {
    "ustar-prefix": (
        tarfile.USTAR_FORMAT,
        [_ti("p" * 80 + "/" + "q" * 90, size=3, uid=7, gid=8, mode=0o4751)],
    ),
    "gnu-long": (
        tarfile.GNU_FORMAT,
        [
            _ti("g" * 200, size=600),
            _ti("lnk", tarfile.SYMTYPE, linkname="t" * 150),
            _ti("big-ids", size=1, uid=0o10000000 + 5, gid=3),
            _ti("raw\udcff", size=2),
        ],
    ),
    "pax": (
        tarfile.PAX_FORMAT,
        [
            _ti(
                "x" * 300,
                size=5,
                pax_headers={"SCHILY.xattr.user.a": "1", "SCHILY.xattr.security.b": "\udcff\x00"},
            ),
            _ti("dev", tarfile.CHRTYPE, devmajor=4, devminor=64, mode=0o620),
            _ti("dir", tarfile.DIRTYPE, mode=0o1777),
            _ti("hard", tarfile.LNKTYPE, linkname="x" * 300),
            _ti("frac", size=1, pax_headers={"mtime": "1700000000.25"}),
            _ti("utf8-é", size=0, uname="ü", gname="g"),
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_parse_header_agrees_with_tarfile(case: str) -> None:
    from bootc_unified.cstorage.tarheader import parse_header

    fmt, members = HEADER_CASES[case]
    tar = _members(fmt, members, {"comment": "global"} if fmt == tarfile.PAX_FORMAT else None)
    global_pax: dict[str, bytes] = {}
    start = 0  # where the previous member's padded content ended: global headers sit in between
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:", errors="surrogateescape") as tf:
        for m in tf.getmembers():
            h = parse_header(tar[start : m.offset_data], global_pax)
            start = m.offset_data + (-(-m.size // 512) * 512 if m.isreg() else 0)
            assert h.name.rstrip(b"/") == m.name.encode("utf-8", "surrogateescape")
            assert h.typeflag == m.type
            assert (h.mode, h.uid, h.gid, h.size, h.mtime) == (m.mode, m.uid, m.gid, m.size, int(m.mtime))
            assert h.linkname == m.linkname.encode("utf-8", "surrogateescape")
            assert h.uname == m.uname.encode() and h.gname == m.gname.encode()
            if m.ischr():
                assert (h.devmajor, h.devminor) == (m.devmajor, m.devminor)
            want_x = {
                k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
                for k, v in m.pax_headers.items()
                if k.startswith("SCHILY.xattr.")
            }
            assert h.xattrs == want_x
            if m.name == "frac":
                assert h.mtime_nsec == 250_000_000
    if fmt == tarfile.PAX_FORMAT:
        assert global_pax == {"comment": b"global"}


def test_parse_header_rejects_garbage() -> None:
    from bootc_unified.cstorage.tarheader import HeaderError, parse_header

    tar = _members(tarfile.USTAR_FORMAT, [_ti("a", size=1)])
    block = bytearray(tar[:512])
    block[0] ^= 1
    with pytest.raises(HeaderError, match="checksum"):
        parse_header(bytes(block), {})
    with pytest.raises(HeaderError, match="512-byte blocks"):
        parse_header(tar[:100], {})
    with pytest.raises(HeaderError, match="unexpected bytes"):
        parse_header(tar[:1024], {})


def test_crcmod_backend_equals_fastcrc() -> None:
    """The guest image has Debian's python3-crcmod instead of the fastcrc wheel: same checksums."""
    import os

    from bootc_unified.cstorage.tarsplit import crc64_iso_crcmod

    other = crc64_iso_crcmod()
    assert other(b"123456789", None) == 0xB90956C775A41001  # the CRC-64/GO-ISO check value
    data = os.urandom(100_000)
    assert other(data, None) == crc64_iso(data)
    assert other(data[50_000:], other(data[:50_000], None)) == crc64_iso(data)


def _with_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def test_parse_plain_agrees_with_parse_header() -> None:
    """The fast path for one-block headers (layerindex) reads what parse_header reads, or declines.
    Oracle: parse_header (checked against tarfile above) on the same blocks, among them blocks with
    numbers and names spelt every way the field syntax allows (NULs, spaces, base-256, junk)."""
    import random

    from bootc_unified.cstorage.tarheader import HeaderError, parse_header, parse_plain

    blocks = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT):
        tar = _members(
            fmt,
            [
                _ti("p" * 80 + "/" + "q" * 90, size=3, uid=7, gid=8, mode=0o4751),
                _ti("dev", tarfile.CHRTYPE, devmajor=4, devminor=64, mode=0o620),
                _ti("dir/", tarfile.DIRTYPE, mode=0o1777),
                _ti("lnk", tarfile.SYMTYPE, linkname="target"),
            ],
        )
        blocks += [
            tar[i : i + 512]
            for i in range(0, len(tar), 512)
            if tar[i + 257 : i + 262] == b"ustar" and tar[i + 156 : i + 157] not in b"xgLK"
        ]
    spellings = [b"0000644\0", b"644     ", b"   644\0\0", b"\0" * 8, b" " * 8, b"\0 644\0\0\0",
                 b"64\0 4\0\0\0", b"644\0 \0\0\0", b"0o644\0\0\0", b"\x80\0\0\0\0\0\x01\xa4",
                 b"+644\0\0\0\0", b"6_44\0\0\0\0", b"9\0\0\0\0\0\0\0", b"\t644\n\0\0\0"]  # fmt: skip
    fields = [(100, 108), (108, 116), (116, 124), (329, 337), (337, 345)]
    rng = random.Random(13)
    checked = declined = 0
    for base in blocks:
        for _ in range(200):
            block = bytearray(base)
            for _ in range(rng.randint(1, 3)):
                start, end = rng.choice(fields)
                block[start:end] = rng.choice(spellings)
            if rng.random() < 0.2:
                block[345:350] = rng.choice([b"\0abcd", b"pre\0x", b"     "])
            if rng.random() < 0.2:  # the name and the link name end at the first NUL
                block[0:100] = rng.choice([b"a\0junk", b"a" * 100, b"\0b"]).ljust(100, b"\0")
                block[157:257] = rng.choice([b"t\0junk", b"t" * 100, b""]).ljust(100, b"\0")
            raw = _with_checksum(block)
            plain = parse_plain(raw)
            try:
                h = parse_header(raw, {})
            except HeaderError:
                assert plain is None
                declined += 1
                continue
            if plain is None:
                declined += 1
                continue
            want = (
                h.name,
                h.typeflag,
                h.mode,
                h.uid,
                h.gid,
                h.size,
                h.mtime,
                h.linkname,
                h.devmajor,
                h.devminor,
            )
            assert plain == want, bytes(block)
            checked += 1
    assert checked > 500 and declined > 100  # both ways taken
    bad = bytearray(blocks[0])
    bad[0] ^= 1
    assert parse_plain(bytes(bad)) is None  # a bad checksum is parse_header's to report
