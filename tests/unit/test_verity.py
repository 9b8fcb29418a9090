"""fs-verity digests against Debian's `fsverity digest` (the oracle), and the kernel probe.

Enable/measure need fs-verity in the kernel. Where the host kernel has none (CONFIG_FS_VERITY is
not set, as on this project's CI host) those tests skip here and their checks run in the trixie
guest instead (tests/vm/test_verity_guest.py runs the same harness/vm/verity_checks.py there).
"""

from __future__ import annotations

import gzip
import os
import platform
import subprocess
from pathlib import Path

import pytest

from bootc_unified import verity
from bootc_unified.verity import HashAlg
from harness.pytest_plugin import require
from harness.vm import verity_checks
from testsupport.plugin import run_cli


def kernel_has_fsverity() -> bool | None:
    """CONFIG_FS_VERITY of the running kernel (/proc/config.gz or /boot/config-RELEASE); None
    when neither can be read."""
    for path, opener in (
        (Path("/proc/config.gz"), gzip.open),
        (Path(f"/boot/config-{platform.release()}"), open),
    ):
        try:
            with opener(path, "rt") as f:
                return any(line.strip() == "CONFIG_FS_VERITY=y" for line in f)
        except OSError:
            continue
    return None


HOST_VERITY = kernel_has_fsverity()
needs_kernel_verity = pytest.mark.skipif(
    HOST_VERITY is False,
    reason="host kernel has no fs-verity; covered by tests/vm/test_verity_guest.py (ext4, btrfs guests)",
)

SIZES = [0, 1, 4095, 4096, 4097, 128 * 1024 + 1, 1 << 20, 64 * 4096, 64 * 4096 + 1, 129 * 4096]


oracle = verity_checks.fsverity_digest  # `fsverity digest`, as hex


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
    """Our capability probe says what `fsverity enable` finds on the same directory (on this host
    both say "no"; the guest tier sees both say "yes")."""
    verity_checks.probe_agrees_with_kernel(tmp_path / "probe")


@needs_kernel_verity
def test_enable_and_measure(tmp_path: Path) -> None:
    support = verity.probe(tmp_path)
    require([] if support.supported else [f"fs-verity on {tmp_path}: {support.reason}"], "enable/measure")
    verity_checks.enable_and_measure(tmp_path)


@pytest.mark.skipif(
    HOST_VERITY is not False, reason="the host kernel may have fs-verity: test_enable_and_measure runs"
)
def test_kernel_without_fsverity_is_named(tmp_path: Path) -> None:
    """Where the kernel has no fs-verity, enable and measure raise VerityUnsupported (not a bare
    OSError, not a silent False/None)."""
    path = tmp_path / "f"
    path.write_bytes(os.urandom(10000))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(verity.VerityUnsupported):
            verity.enable(fd, HashAlg.SHA512)
        with pytest.raises(verity.VerityUnsupported):
            verity.measure(fd)
    finally:
        os.close(fd)
