"""Install to a disk the bootc way and boot it from composefs, once per filesystem.

An installer VM (the v1 smoke disk) gets a blank second disk, pulls v1 from the host's registry
with its own podman and runs, as bootc documents it,

    podman run --privileged --pid=host -v /dev:/dev -v /var/lib/containers:/var/lib/containers \\
        <v1> bootc-unified install to-disk --experimental-unified-storage --filesystem FS /dev/vdb

(the source image is the container's own, read from /run/.containerenv). The installed disk then
boots alone through OVMF + systemd-boot, and over SSH:
- `/` is an overlay with source `composefs:<id>`; the id is the BLS entry's and `status`'s;
  the kargs.d karg is on the kernel command line; `status --format json` has bootc's fields and
  names the installed image and its manifest digest (the registry's, per skopeo on the host);
- every object of the repository is zero-copy with the bootc store's diff/ files, by what the
  kernel says (harness.zerocopy_audit: same inode with st_nlink >= 2 on ext4, FIEMAP-shared
  extents on btrfs/XFS); the install reports 0 bytes copied; disk use is measured (the root
  filesystem against the image's size, and the report's figures: image bytes, bootc store,
  repository extra < half of a plain copy's cost);
- ext4/btrfs: the root overlay has verity=require and `fsverity measure` of every object equals
  its name; XFS: `status` says verity is not enforced (composefs=?<id>);
- `podman run --rm <booted image> cat /usr/lib/os-release` with the guest's own podman and no flags
  prints v1's os-release, and `podman images` lists the image;
- with --user-image (a user's image, derived from our base, standing in for v1: harness.userimages)
  the same, except the built-in image's own karg (bootc_unified.test=1, from its kargs.d);
- /usr is read-only; /etc and /var writes survive a reboot.
Per step on the installed system: wall seconds, boots, disk used and the figures ->
artifacts/vm/<test>/install-steps.json (the qualification report reads it).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from bootc_unified.deploy.disk import MKFS
from harness import installed
from harness.guestmodules import run_module, ship
from harness.lifecycle import Steps, disk_figures, mount_esp
from harness.pytest_vm import Disk, DiskFactory, GuestImages, VmFactory, artifacts_dir
from harness.registry import Registry, manifest_digest
from harness.vm import Machine

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.sample("btrfs")]

VERITY = {"btrfs": True, "ext4": True, "xfs": False}
STATUS_ENTRY_KEYS = {
    "image",
    "cachedUpdate",
    "incompatible",
    "pinned",
    "softRebootCapable",
    "downloadOnly",
    "store",
    "composefs",
    "unified",
}


# Beyond the image's bytes (x 1.05) and the empty filesystem: the EROFS image, splitstreams and
# tar-split data, the deployment's /etc copy and /var seed, podman's and the repository's metadata.
FIXED_COST = 160 << 20


def empty_fs_used(vm: Machine, fs: str) -> int:
    """Bytes used on a new, empty filesystem of `fs` as large as the installed root partition, made
    with install's own mkfs options."""
    device = vm.run(["findmnt", "-n", "-o", "SOURCE", "/sysroot"]).stdout.strip().split("[")[0]
    size = vm.run(["lsblk", "-b", "-n", "-d", "-o", "SIZE", device]).stdout.strip()
    script = (
        f"truncate -s {size} /var/tmp/empty.img && {shlex.join(MKFS[fs])} /var/tmp/empty.img >/dev/null && "
        "mkdir -p /run/empty && mount -o loop /var/tmp/empty.img /run/empty && "
        "stat -f -c '%S %b %f' /run/empty; umount /run/empty; rm -f /var/tmp/empty.img"
    )
    block, blocks, free = (int(f) for f in vm.run(script).stdout.split())
    return block * (blocks - free)


def used_bytes(vm: Machine, path: str) -> int:
    fields = vm.run(["stat", "-f", "-c", "%S %b %f", path]).stdout.split()
    size, blocks, free = (int(f) for f in fields)
    return size * (blocks - free)


def test_install_to_disk(
    fs_kind: str,
    disk_factory: DiskFactory,
    vm_factory: VmFactory,
    guest_image: GuestImages,
    registry: Registry,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    target = installed.blank_disk(tmp_path / "installed.qcow2")
    installer = vm_factory(disk_factory("v1", fs_kind), extra_disks=(target,))
    pushed = guest_image.push("v1", registry, installed.REFERENCES["v1"])
    host_ref = pushed.replace("10.0.2.2:", "127.0.0.1:", 1)
    ref = installed.variant_ref("v1")  # bootc-unified.test/os:latest, mapped to `registry`
    run = installed.run_install(installer, ref, fs_kind, unified=True, registry_address=registry.address)
    print(f"{fs_kind}: install to-disk {run.seconds:.0f}s\n{run.output}")
    assert "unified" in run.output and "not unified" not in run.output, run.output
    assert "bytes copied: 0" in run.output, run.output
    installer.poweroff()
    # boot this install (a cached one may come from another run); cache it once it has passed
    fresh = installed.InstalledBase(target, fs_kind, guest_image("v1").image_id, unified=True)
    vm = vm_factory(Disk(fresh, installed.overlay(fresh, tmp_path / "installed-boot.qcow2")))
    print(f"{fs_kind}: installed system boot to SSH {vm.timings.boots_to_ssh[-1]:.0f}s")
    steps = Steps(vm, artifacts_dir(request) / "install-steps.json", "install", fs_kind)
    user_image = guest_image.is_user("v1")  # --user-image: only the generic checks apply

    with steps.step("boot the installed system: composefs, status, ESP") as facts:
        facts.update(
            image="user" if user_image else "built-in",
            install_seconds=round(run.seconds, 1),
            boot_to_ssh=round(vm.timings.boots_to_ssh[-1], 1),
        )
        # / is composefs, and the id is everyone's
        source, options = vm.run(["findmnt", "-n", "-o", "SOURCE,OPTIONS", "/"]).stdout.split()
        assert source.startswith("composefs:"), source
        depl_id = source.removeprefix("composefs:")
        cmdline = vm.run(["cat", "/proc/cmdline"]).stdout.split()
        if not user_image:  # the built-in image's kargs.d
            assert "bootc_unified.test=1" in cmdline, cmdline
        want = f"composefs={depl_id}" if VERITY[fs_kind] else f"composefs=?{depl_id}"
        assert want in cmdline, cmdline
        assert ("verity=require" in options.split(",")) == VERITY[fs_kind], options

        status = json.loads(vm.run(["bootc-unified", "status", "--format", "json"]).stdout)
        assert status["apiVersion"] == "org.containers.bootc/v1" and status["kind"] == "BootcHost"
        booted = status["status"]["booted"]
        assert set(booted) >= STATUS_ENTRY_KEYS, booted
        assert status["status"]["staged"] is None and status["status"]["rollback"] is None
        assert status["status"]["rollbackQueued"] is False
        assert booted["composefs"]["verity"] == depl_id
        assert booted["composefs"]["missingVerityAllowed"] is (not VERITY[fs_kind])
        assert booted["composefs"]["bootType"] == "Bls" and booted["composefs"]["bootloader"] == "systemd"
        assert booted["unified"] is True
        image = booted["image"]["image"]
        assert (image["image"], image["transport"]) == (ref, "registry"), image
        assert status["spec"]["image"]["image"] == ref
        assert booted["image"]["imageDigest"] == manifest_digest(host_ref)
        # status mounted the ESP in its own mount namespace: gone with it, nothing left mounted
        assert vm.run(["findmnt", "-n", "-t", "vfat"], check=False).stdout == ""
        esp = mount_esp(vm)
        entry_text = vm.run(f"cat {esp}/loader/entries/*.conf").stdout
        assert f"composefs={'' if VERITY[fs_kind] else '?'}{depl_id}" in entry_text, entry_text
        facts["booted"] = depl_id

    with steps.step("zero-copy audit, fs-verity, disk use") as facts:
        # zero-copy, by what the kernel says about every object
        ship(vm)
        audit = json.loads(
            run_module(vm, "zerocopy_audit", "/sysroot/composefs", "/sysroot/ostree/bootc/storage")
        )
        counts = {k: len(v) for k, v in audit.items()}
        print(f"{fs_kind}: zero-copy audit {counts}")
        facts["audit"] = counts
        assert audit["unaccounted"] == {}, audit["unaccounted"]
        shared = audit["hardlinked"] if fs_kind == "ext4" else audit["reflinked"]
        assert len(shared) > 1000, counts
        if VERITY[fs_kind]:
            # one fsverity process for all objects (a process per file is minutes under TCG)
            measure = "find . -type f -print0 | sort -z | xargs -0 fsverity measure"
            measured = vm.run(
                f"cd /sysroot/composefs/objects && {measure}", timeout=vm.timeout(900)
            ).stdout.splitlines()
            # "sha512:<hex> ./XX/rest": the digest is the object's name
            pairs = [line.split(maxsplit=1) for line in measured]
            bad = [p for p in pairs if p[0].partition(":")[2] != p[1].removeprefix("./").replace("/", "")]
            assert len(measured) > 1000 and bad == [], (len(measured), bad[:20])
        # the report's figures: the repository shares the store's data, so it adds a fraction of
        # what a plain copy of its files would take
        facts.update(disk_figures(vm, ref))
        image_bytes = facts["image_bytes"]
        assert facts["repository_extra_bytes"] < facts["plain_copy_bytes"] // 2, facts
        used = used_bytes(vm, "/sysroot")
        empty = empty_fs_used(vm, fs_kind)
        allowed = int(image_bytes * 1.05) + empty + FIXED_COST
        print(
            f"{fs_kind}: image {image_bytes / 1e6:.0f} MB, root filesystem used {used / 1e6:.0f} MB "
            f"(empty {fs_kind}: {empty / 1e6:.0f} MB; allowed {allowed / 1e6:.0f} MB)"
        )
        assert used <= allowed, (used, image_bytes, empty)

    with steps.step("podman run the booted image") as facts:
        # the guest's own podman, no flags
        assert ref in vm.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"]).stdout
        os_release = vm.run(["podman", "run", "--rm", ref, "cat", "/usr/lib/os-release"]).stdout
        assert os_release == vm.run(["cat", "/usr/lib/os-release"]).stdout, os_release
        assert "VERSION_ID" in os_release

    with steps.step("reboot: /usr read-only, /etc and /var kept") as facts:
        touched = vm.run(["touch", "/usr/bootc-unified-test"], check=False)
        assert not touched.ok and "Read-only file system" in touched.stderr, touched
        vm.run("echo etc-kept > /etc/bootc-unified-test && echo var-kept > /var/bootc-unified-test && sync")
        vm.reboot()
        facts["reboot_to_ssh"] = round(vm.timings.reboots[-1], 1) if vm.timings.reboots else None
        assert vm.run(["cat", "/etc/bootc-unified-test", "/var/bootc-unified-test"]).stdout.split() == [
            "etc-kept",
            "var-kept",
        ]
        assert vm.run(["findmnt", "-n", "-o", "SOURCE", "/"]).stdout.strip() == source
    vm.poweroff()
    installed.save(target, fresh.image_id, fs_kind, unified=True)  # later scenarios start from it
