"""VM smoke scenario, once per filesystem (ci/test's sample: XFS, the filesystem the other CI
scenarios boot least): boot v1 through OVMF and systemd-boot, check the root filesystem,
fs-verity, podman pull/run from the host's registry, reboot, clean power-off."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from harness.pytest_vm import GuestImages, artifacts_dir
from harness.registry import Registry
from harness.vm import Machine

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.sample("xfs")]

# Guest kernel 6.12: fs-verity on ext4 (with the verity feature) and btrfs; XFS has none.
VERITY = {"btrfs": True, "ext4": True, "xfs": False}


def loader_entry_selected(vm: Machine) -> str:
    """The BLS entry systemd-boot booted (its LoaderEntrySelected EFI variable: 4 attribute bytes,
    then UTF-16LE)."""
    script = (
        "import glob; p = glob.glob('/sys/firmware/efi/efivars/LoaderEntrySelected-*')[0]; "
        "print(open(p, 'rb').read()[4:].decode('utf-16-le').rstrip('\\0'))"
    )
    return vm.run(["python3", "-c", script]).stdout.strip()


def check_verity(vm: Machine, fs: str) -> None:
    path = "/var/tmp/verity-probe"
    vm.run(f"head -c 300000 /dev/urandom > {path} && sync")
    expected = vm.run(["fsverity", "digest", "--hash-alg=sha256", path]).stdout.split()[0]
    enabled = vm.run(["fsverity", "enable", "--hash-alg=sha256", path], check=False)
    if not VERITY[fs]:
        assert not enabled.ok, f"fs-verity unexpectedly enabled on {fs}"
        assert "not supported" in enabled.stderr.lower() or "inappropriate ioctl" in enabled.stderr.lower(), (
            enabled
        )
        return
    assert enabled.ok, f"fsverity enable failed on {fs}: {enabled.stderr.strip()}"
    measured = vm.run(["fsverity", "measure", path]).stdout.split()[0]
    assert measured == expected, f"measured {measured} != userspace digest {expected}"


def test_smoke(
    fs_kind: str,
    vm: Machine,
    guest_image: GuestImages,
    registry: Registry,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    timings: dict[str, float | str] = {"fs": fs_kind, "backend": vm.backend, "accel": vm.spec.accel.name}
    timings["boot_to_ssh"] = vm.timings.boots_to_ssh[-1]

    # Booted through the UEFI chain the deployments will use, from the expected root filesystem.
    assert vm.run("findmnt -n -o FSTYPE /").stdout.strip() == fs_kind
    assert vm.run("cat /usr/lib/bootc-unified/version").stdout.strip() == "v1"
    assert loader_entry_selected(vm) == "bootc-unified-v1.conf"
    assert (
        vm.run("python3 -c 'import bootc_unified; print(bootc_unified.__name__)'").stdout.strip()
        == "bootc_unified"
    )
    vm.run("bootc-unified --help")

    check_verity(vm, fs_kind)

    # Files both ways over SFTP.
    sent = tmp_path / "sent.bin"
    sent.write_bytes(os.urandom(100_000))
    vm.put(sent, "/var/tmp/sent.bin")
    assert (
        vm.run("sha256sum /var/tmp/sent.bin").stdout.split()[0]
        == hashlib.sha256(sent.read_bytes()).hexdigest()
    )
    vm.get("/var/tmp/sent.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == sent.read_bytes()

    # podman in the guest pulls from the host's registry (10.0.2.2, insecure by the image's config).
    ref = guest_image.push("app", registry)
    started = time.monotonic()
    vm.run(["podman", "pull", "--quiet", ref], timeout=vm.timeout(60))
    timings["podman_pull"] = time.monotonic() - started
    out = vm.run(["podman", "run", "--rm", ref], timeout=vm.timeout(60)).stdout
    assert "bootc-unified-app v1" in out

    reboot = vm.reboot()
    assert reboot.boot_id_after != reboot.boot_id_before
    timings["reboot_to_ssh"] = reboot.seconds
    assert vm.run("findmnt -n -o FSTYPE /").stdout.strip() == fs_kind

    soft = vm.soft_reboot()
    assert soft.boot_id_after == soft.boot_id_before
    assert soft.soft_reboots_after == soft.soft_reboots_before + 1
    timings["soft_reboot_to_ssh"] = soft.seconds

    started = time.monotonic()
    vm.poweroff()
    timings["poweroff"] = time.monotonic() - started
    assert not vm.is_running()
    assert "reboot: Power down" in vm.console_text()

    out_dir = artifacts_dir(request)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(json.dumps(timings))
