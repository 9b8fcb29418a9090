"""Tampering (issue 12, R5): bytes changed behind the filesystem's back, on an installed system with
two deployments (v1 installed, upgraded to v2 and rebooted: v2 booted, v1 the rollback).

1. An object: the data of a file of the booted root (its object found by the file's own
   `fsverity digest`, not by product code) changed with a write to the block device at the offset
   FIEMAP reports (harness.tamper_guest), caches dropped. Reading the file under the
   verity-enforced root gives EIO on ext4 and btrfs (fs-verity; on btrfs its data checksum
   answers first); on XFS (no fs-verity in the guest kernel, composefs=? boots) the read succeeds
   with other bytes, which is why fsck exists: `fsck` names the object on all three.
2. An EROFS image: v1's image (the rollback deployment's) changed in its superblock. `status`
   names the damage beside v1, `fsck` names the image's object, `rollback` refuses to make it the
   default; booting it anyway (`bootctl set-oneshot` to its entry) fails in the initramfs with a
   console line naming the image, and the machine, powered off and on, boots its default (v2).
3. The ESP as a power cut can leave it (FAT has no journal): `loader/entries.staged`'s cluster
   never written (harness.tamper_guest --fat-dir). `status` still answers, naming the unreadable
   directory; at the next boot bootc-unified-esp-fsck.service repairs it (`fsck.fat -a`), and
   `fsck.fat -n` (the oracle) finds the ESP clean.
"""

from __future__ import annotations

import json
import re

import pytest

from harness import installed
from harness.guestmodules import run_module, ship
from harness.installed import REFERENCES, variant_ref
from harness.lifecycle import REPO, Steps, entry_id, esp_check, esp_device, expect_status, mount_esp, status
from harness.powercut import console_mark, console_since, wait_console
from harness.pytest_vm import GuestImages, InstalledDiskFactory, VmFactory, artifacts_dir
from harness.registry import Registry
from harness.vm import Machine

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.sample("ext4")]

OS = variant_ref("v1")
VERITY = {"ext4": True, "btrfs": True, "xfs": False}  # fs-verity in the trixie guest kernel
UPGRADE_TIMEOUT = 180


def object_of(vm: Machine, path: str) -> str:
    """The repository object holding `path`'s data, by the file's fs-verity digest (fsverity-utils)."""
    digest = vm.run(["fsverity", "digest", "--hash-alg=sha512", path]).stdout.split()[0]
    hexdigest = digest.removeprefix("sha512:")
    obj = f"{REPO}/objects/{hexdigest[:2]}/{hexdigest[2:]}"
    vm.run(["test", "-f", obj])
    return obj


def fsck(vm: Machine) -> tuple[bool, str]:
    got = vm.run(
        ["bootc-unified", "internals", "cfs", "--repo", REPO, "fsck"], timeout=vm.timeout(600), check=False
    )
    return got.ok, got.stdout + got.stderr


def sha256(vm: Machine, path: str) -> tuple[bool, str]:
    got = vm.run(["sha256sum", path], check=False)
    return got.ok, (got.stdout.split()[0] if got.ok else got.stderr.strip())


def entry_file(vm: Machine, depl_id: str) -> str:
    """The ESP's BLS entry file (systemd-boot's entry id) whose `composefs=` names `depl_id`."""
    esp = mount_esp(vm)
    out = vm.run(f"grep -l 'composefs=?*{depl_id}' {esp}/loader/entries/*.conf").stdout.split()
    assert len(out) == 1, out
    return out[0].rsplit("/", 1)[1]


ONESHOT = "/sys/firmware/efi/efivars/LoaderEntryOneShot-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"


def set_oneshot(vm: Machine, entry: str) -> None:
    """`bootctl set-oneshot ENTRY` (bootctl is not in the guest): systemd-boot's LoaderEntryOneShot
    EFI variable, attributes NV|BS|RT then the entry id in UTF-16LE with a NUL, in one write."""
    code = (
        "import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644); "
        "os.write(fd, b'\\x07\\x00\\x00\\x00' + (sys.argv[2] + '\\0').encode('utf-16-le')); os.close(fd)"
    )
    vm.run(["python3", "-c", code, ONESHOT, entry])


def test_tamper(
    fs_kind: str,
    installed_disk_factory: InstalledDiskFactory,
    vm_factory: VmFactory,
    guest_image: GuestImages,
    registry: Registry,
    request: pytest.FixtureRequest,
) -> None:
    fs = fs_kind
    guest_image("v1"), guest_image("v2"), guest_image("app")
    disk = installed_disk_factory("v1", fs, True)
    vm = vm_factory(disk)
    steps = Steps(vm, artifacts_dir(request) / "tamper-steps.json", "tamper", fs)

    with steps.step("upgrade to v2, reboot") as facts:
        installed.map_test_registry(vm, registry.address)
        v1_id = entry_id(status(vm)["status"]["booted"])
        assert v1_id is not None
        guest_image.push("app", registry, REFERENCES["app"])  # v2 binds it
        guest_image.push("v2", registry, REFERENCES["v2"])
        vm.run(["bootc-unified", "upgrade"], timeout=vm.timeout(UPGRADE_TIMEOUT))
        vm.reboot()
        doc = expect_status(vm, booted=OS, rollback=OS)
        v2_id = entry_id(doc["status"]["booted"])
        assert entry_id(doc["status"]["rollback"]) == v1_id and v2_id != v1_id
        ship(vm)

    with steps.step("tamper an object") as facts:
        # a file of the booted root no process has mapped, large enough not to be inline (btrfs)
        victim = vm.run(
            "find /usr -xdev -type f ! -perm /111 ! -name '*.so*' -size +256k -size -4M -printf '%s %p\\n'"
            " | sort -n | tail -n 1"
        ).stdout.split()[1]
        obj = object_of(vm, victim)
        ok, before = sha256(vm, victim)
        assert ok, before
        if fs == "btrfs":  # its checksum catches the change first, and says so at every read
            vm.expect_console_lines(
                r"BTRFS (warning|error) \(device vd[a-z]\d+\): (csum failed root \d+ ino \d+ off "
                r"|bdev /dev/vd[a-z]\d+ errs: wr 0, rd 0, flush 0, corrupt \d+, gen 0$)"
            )
        with vm.trouble_expected():
            facts["tamper"] = json.loads(run_module(vm, "tamper_guest", obj, "4096"))
            ok, after = sha256(vm, victim)
            fsck_ok, report = fsck(vm)
        facts.update(victim=victim, read=after, fsck=report.strip().splitlines()[-3:])
        if VERITY[fs]:
            assert not ok and "Input/output error" in after, (victim, after)
        else:
            assert ok and after != before, (victim, before, after)
        assert not fsck_ok, report
        rel = obj.removeprefix(f"{REPO}/")
        assert re.search(rf"(unreadable|corrupt) object {re.escape(rel)}\b", report), report

    with steps.step("tamper v1's EROFS image, boot it") as facts:
        image = vm.run(["readlink", "-f", f"{REPO}/images/{v1_id}"]).stdout.strip()
        with vm.trouble_expected():
            facts["tamper"] = json.loads(run_module(vm, "tamper_guest", image, "1024"))  # the superblock
            got = vm.run(["bootc-unified", "status", "--format", "json"])  # problems: warnings on stderr
            fsck_ok, report = fsck(vm)
            refused = vm.run(["bootc-unified", "rollback"], check=False)
        warnings = got.stderr.strip().splitlines()
        facts.update(status_warnings=warnings, fsck=report.strip().splitlines()[-3:])
        named = [w for w in warnings if v1_id[:16] in w and f"images/{v1_id}" in w and "EROFS image is" in w]
        assert named, warnings
        assert json.loads(got.stdout)["status"]["rollback"] is not None  # still listed
        assert not fsck_ok and image.removeprefix(f"{REPO}/") in report, report
        assert not refused.ok and f"images/{v1_id}" in refused.stderr, refused
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        expect_status(vm, booted=OS, rollback=OS)  # nothing queued
        entry = entry_file(vm, v1_id)
        set_oneshot(vm, entry)
        with vm.trouble_expected():
            mark = console_mark(vm)
            vm.ssh.start("sleep 1; systemctl reboot")
            vm.ssh.close()
            vm.wait_stopped(vm.timeout(300))  # QEMU exits on the reboot (-no-reboot)
            vm.start()
            failed = wait_console(vm, mark, f"bootc-unified: {v1_id}", vm.timeout(300))
            lines = [line for line in console_since(vm, mark) if line.startswith("bootc-unified:")]
            vm.destroy()
        facts["console"] = lines
        assert failed, lines
        assert any(v1_id in line and "composefs root" not in line for line in lines), lines
        vm.start()
        vm.wait_ssh()
        doc = expect_status(vm, booted=OS, rollback=OS)
        assert (entry_id(doc["status"]["booted"]), entry_id(doc["status"]["rollback"])) == (v2_id, v1_id)

    with steps.step("the ESP as a power cut leaves it, reboot") as facts:
        esp = mount_esp(vm)
        booted_entry = entry_file(vm, v2_id)
        vm.run(
            f"mkdir {esp}/loader/entries.staged && cp {esp}/loader/entries/{booted_entry} "
            f"{esp}/loader/entries.staged/ && umount {esp}"
        )
        device = esp_device(vm)
        with vm.trouble_expected():  # the kernel's FAT errors, and the ESP remounted read-only
            damage = run_module(vm, "tamper_guest", "--fat-dir", device, "loader/entries.staged")
            facts["tamper"] = json.loads(damage)
            got = vm.run(["bootc-unified", "status", "--format", "json"], check=False)
        assert got.ok, got.stderr
        named = [w for w in got.stderr.splitlines() if "entries.staged: cannot read boot entries" in w]
        assert named, got.stderr
        assert entry_id(json.loads(got.stdout)["status"]["booted"]) == v2_id
        vm.reboot()  # bootc-unified-esp-fsck.service repairs it before anything mounts it
        said, verdict = esp_check(vm)
        facts.update(status_warnings=named, esp_fsck=said, fsck_fat=verdict)
        assert said.startswith(f"ESP {device}: repaired by fsck.fat -a") and "entries.staged" in said, said
        got = vm.run(["bootc-unified", "status", "--format", "json"])
        assert "entries.staged" not in got.stderr, got.stderr
        assert entry_id(json.loads(got.stdout)["status"]["booted"]) == v2_id
    vm.poweroff()
