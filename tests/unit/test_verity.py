"""fs-verity digests against Debian's `fsverity digest` (the oracle), and the kernel probe."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bootc_unified import verity
from bootc_unified.verity import HashAlg
from harness.pytest_plugin import run_cli

SIZES = [0, 1, 4095, 4096, 4097, 128 * 1024 + 1, 1 << 20, 64 * 4096, 64 * 4096 + 1, 129 * 4096]


def oracle(path: Path, alg: str) -> str:
    out = subprocess.run(
        ["fsverity", "digest", f"--hash-alg={alg}", str(path)], check=True, capture_output=True, text=True
    ).stdout
    digest = out.split()[0]
    assert digest.startswith(f"{alg}:")
    return digest.split(":", 1)[1]


@pytest.mark.parametrize("alg", ["sha256", "sha512"])
@pytest.mark.parametrize("size", SIZES)
def test_digest_matches_fsverity(tmp_path: Path, size: int, alg: str) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(size))
    expected = oracle(path, alg)
    assert verity.digest_file(path, HashAlg.from_name(alg)).hex() == expected
    assert verity.digest_bytes(path.read_bytes(), HashAlg.from_name(alg)).hex() == expected


def test_known_vector() -> None:
    digest = verity.digest_bytes(b"hello world", HashAlg.SHA256).hex()
    assert digest == "1e2eaa4202d750a41174ee454970b92c1bc2f925b1e35076d8c7d5f56362ba64"


@pytest.mark.slow
@pytest.mark.parametrize("alg", ["sha256", "sha512"])
def test_large_random_file(tmp_path: Path, alg: str) -> None:
    path = tmp_path / "big"
    size = 300 * (1 << 20) + 12345
    with open(path, "wb") as f:
        chunk = os.urandom(1 << 20)
        for i in range(300):
            f.write(chunk[i:] + chunk[:i])
        f.write(os.urandom(12345))
    assert path.stat().st_size == size
    assert verity.digest_file(path, HashAlg.from_name(alg)).hex() == oracle(path, alg)


def test_cli_output_like_fsverity(tmp_path: Path) -> None:
    files = []
    for i, size in enumerate([0, 5000]):
        p = tmp_path / f"f{i}"
        p.write_bytes(os.urandom(size))
        files.append(p)
    for alg in ("sha256", "sha512"):
        ours = run_cli("internals", "verity", "digest", "--hash", alg, *files).stdout
        theirs = subprocess.run(
            ["fsverity", "digest", f"--hash-alg={alg}", *map(str, files)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert ours == theirs


def test_probe_agrees_with_kernel(tmp_path: Path) -> None:
    """Our capability probe says what `fsverity enable` finds on the same directory."""
    sample = tmp_path / "sample"
    sample.write_bytes(b"probe me")
    enabled = subprocess.run(["fsverity", "enable", str(sample)], capture_output=True, text=True)
    support = verity.probe(tmp_path)
    assert support.supported == (enabled.returncode == 0), (support, enabled.stderr)
    if not support.supported:
        assert "fs-verity" in support.reason
    assert sorted(os.listdir(tmp_path)) == ["sample"]  # the probe left nothing behind


def test_enable_and_measure_where_supported(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(10000))
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            assert verity.enable(fd, HashAlg.SHA512) is True
        except verity.VerityUnsupported:
            with pytest.raises(verity.VerityUnsupported):
                verity.measure(fd)
            return
        measured = verity.measure(fd)
        assert measured is not None
        assert measured[0] is HashAlg.SHA512
        assert measured[1].hex() == oracle(path, "sha512")
        assert verity.enable(fd, HashAlg.SHA512) is False  # already on
    finally:
        os.close(fd)
