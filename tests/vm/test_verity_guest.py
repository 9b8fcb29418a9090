"""fs-verity enable/measure through bootc_unified.verity where the kernel has it: the trixie guest
(kernel 6.12) on its ext4 (-O verity) and btrfs root. The host kernel has no fs-verity, so these
are the checks tests/unit/test_verity.py skips there: the same harness/vm/verity_checks.py, run by
the guest's python3 against the guest's installed bootc_unified, then checked again from outside
with the guest's `fsverity measure` (the kernel) and `fsverity digest` (userspace)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.vm import Machine, verity_checks

# ci/test's sample: ext4 (btrfs's fs-verity is CI's through install and zstd-chunked, which boot
# and import with verity required there)
pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.fs("ext4", "btrfs"), pytest.mark.sample("ext4")]

SCRIPT = "/var/tmp/verity_checks.py"
WORKDIR = "/var/tmp/verity-checks"


def test_enable_and_measure_in_guest(fs_kind: str, vm: Machine) -> None:
    vm.put(Path(verity_checks.__file__), SCRIPT)
    out = vm.run(["python3", SCRIPT, WORKDIR], timeout=vm.timeout(60))
    results = json.loads(out.stdout)
    assert vm.run(["findmnt", "-n", "-o", "FSTYPE", "-T", WORKDIR]).stdout.strip() == fs_kind

    # The probe and `fsverity enable` agree, and both say yes here.
    assert results["probe"]["supported"] is True, results["probe"]

    made = results["enable_and_measure"]
    assert sorted(made) == ["sha256", "sha512"]
    for alg, path in made.items():
        assert path.startswith(f"{WORKDIR}/")
        measured = vm.run(["fsverity", "measure", path]).stdout.split()[0]
        digest = vm.run(["fsverity", "digest", f"--hash-alg={alg}", path]).stdout.split()[0]
        assert measured == digest, f"{path}: kernel {measured} != userspace {digest}"
        assert measured.startswith(f"{alg}:")
