"""DigestPool: digests from worker processes equal `fsverity digest`'s (the oracle), in the order
asked; what is not a readable regular file gives None; a digest does not match a changed file.

Also the incremental Digester fed in odd piece sizes, and the tar header checksum (unsigned and the
old signed form), which the EROFS build checks for every member.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from bootc_unified.cstorage.tarheader import _checksum_ok
from bootc_unified.digestpool import BATCH_FILES, DigestPool
from bootc_unified.verity import Digester, HashAlg, digest_bytes
from harness.pytest_plugin import require

SIZES = [0, 1, 4095, 4096, 4097, 65, 8192 * 3 + 7, 4096 * 129, 1 << 20]


def fsverity_digests(paths: list[Path], alg: HashAlg) -> list[bytes]:
    require([] if shutil.which("fsverity") else ["fsverity (fsverity-utils)"], "checking digests")
    out = subprocess.run(
        ["fsverity", "digest", f"--hash-alg={alg.label}", "--block-size=4096", *map(str, paths)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [bytes.fromhex(line.split(" ")[0].split(":")[1]) for line in out.splitlines()]


@pytest.mark.parametrize("alg", list(HashAlg))
def test_pool_digests_equal_fsverity_in_order(tmp_path: Path, alg: HashAlg) -> None:
    paths = []
    # More files than one batch, so several requests to each worker are in flight.
    for i in range(3 * BATCH_FILES + 5):
        path = tmp_path / f"f{i}"
        path.write_bytes(os.urandom(SIZES[i % len(SIZES)]))
        paths.append(path)
    with DigestPool(alg, workers=2) as pool:
        got = list(pool.map((os.fsencode(p), None) for p in paths))
    assert [d.digest if d else None for d in got] == fsverity_digests(paths, alg)
    for path, digest in zip(paths, got, strict=True):
        assert digest is not None and digest.matches(os.stat(path))


def test_pool_gives_none_for_what_it_cannot_digest(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x" * 5000)
    os.mkfifo(tmp_path / "fifo")  # opened without waiting, then refused
    os.symlink("file", tmp_path / "link")  # not followed
    (tmp_path / "dir").mkdir()
    names = ["missing", "fifo", "link", "dir", "file"]
    with DigestPool(HashAlg.SHA256, workers=1) as pool:
        got = list(pool.map((os.fsencode(tmp_path / n), None) for n in names))
    assert got[:4] == [None] * 4
    assert got[4] is not None and got[4].digest == fsverity_digests([tmp_path / "file"], HashAlg.SHA256)[0]


def test_digest_does_not_match_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 10000)
    with DigestPool(HashAlg.SHA512, workers=1) as pool:
        [digest] = list(pool.map([(os.fsencode(path), 10000)]))
    assert digest is not None and digest.matches(os.stat(path))
    with open(path, "r+b") as f:
        f.write(b"b")
    assert not digest.matches(os.stat(path))


@pytest.mark.parametrize("piece", [1, 100, 4096, 5000, 1 << 16])
def test_digester_in_pieces(piece: int) -> None:
    data = os.urandom(4096 * 130 + 17)
    digester = Digester(HashAlg.SHA512)
    for off in range(0, len(data), piece):
        digester.update(memoryview(data)[off : off + piece])
    assert digester.finish() == digest_bytes(data, HashAlg.SHA512)


def test_tar_header_checksum_unsigned_and_signed() -> None:
    info = tarfile.TarInfo("caf\xe9-" + "x" * 40)
    block = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT, encoding="latin-1")[:512])
    assert _checksum_ok(bytes(block))  # tarfile writes the unsigned sum
    block[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in block)
    block[148:156] = b"%06o\0 " % signed
    assert _checksum_ok(bytes(block))
    block[0] ^= 1
    assert not _checksum_ok(bytes(block))
