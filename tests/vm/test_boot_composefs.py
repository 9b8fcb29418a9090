"""Boot a hand-made composefs deployment (ext4 only: tests/vm/test_install.py boots installed
systems on all three filesystems; this one keeps the early-boot script's own proof, independent of
`install`, and its refusal of a missing image): the v1 guest (plain boot) pulls its own image
into the bootc store, imports it zero-copy into a composefs repository and gets a default BLS entry
with `composefs=[?]<id>`, by hand (`deploy_by_hand`: the existing `cfs` verbs, no `install`); the
reboot goes through our initramfs script (bootc_unified/boot/initramfs/). Checked in the booted
system: / is the read-only overlay `composefs:<id>` (verity=require on ext4/btrfs) with the EROFS
mounted from its file, the kargs.d karg is on the command line, /usr is read-only, /etc and /var
writes land in the deployment's state and survive a power cycle, /sysroot is the physical root
read-only, podman with no flags sees the bootc store. Then an entry naming a missing image stops
the boot with one named console line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from harness.lifecycle import wait_esp_check
from harness.pytest_vm import Disk, GuestImages, artifacts_dir, backend_for
from harness.registry import Registry
from harness.ssh import KeyPair
from harness.vm import Accel, Machine, MachineSpec, create, find_firmware, free_port
from harness.vm.console import scan

# Not in ci/test (~15 min under TCG; CI boots composefs through install, lifecycle and tamper, and
# tamper's tampered image stops the boot with a named console line as a missing one does here):
# `ci/qualify --scenario boot-composefs` and --scenarios all run it.
pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.fs("ext4"), pytest.mark.qualification_only]

VERITY = {"btrfs": True, "ext4": True, "xfs": False}
STORE = "/ostree/bootc/storage"
REPO = "/composefs"
WORK = "/run/bootc-unified-test"
ESP = f"{WORK}/esp"
TEST_KARG = "bootc_unified.test=1"  # images/guest/base.toml [bootable] kargs.d
MISSING_ID = "0" * 128
NEGATIVE_WAIT = 120.0  # seconds on KVM (x10 on TCG) for the boot to stop


@dataclass(frozen=True)
class Deployment:
    image_id: str
    entry: str  # BLS entry file name in loader/entries
    options: str  # its options line


def console_kargs(cmdline: str) -> str:
    """The base disk's console and systemd arguments (not its root=, rootfstype=, rw)."""
    return " ".join(a for a in cmdline.split() if a.startswith(("console=", "systemd.")))


def mount_esp(vm: Machine, disk: Disk) -> None:
    wait_esp_check(vm)  # a composefs boot checks the ESP without the boot waiting; a plain one does not
    device = f"/dev/disk/by-partuuid/{disk.base.esp_partuuid}"
    vm.run(f"mkdir -p {ESP} && (mountpoint -q {ESP} || mount -t vfat {device} {ESP})")


def write_default_entry(
    vm: Machine, os_root: str, physical: str, image_id: str, kernel_id: str, prefix: str, extra: str
) -> Deployment:
    """A BLS entry named as bootc names it (bootc_<os_id>-<version>-1.conf, sort-key
    bootc-<os_id>-0; os-release and kargs.d from the image at `os_root`), booting `image_id` with
    the kernel in EFI/Linux/bootc_composefs-<kernel_id>/, made loader.conf's default."""
    kargs = (
        "import glob, tomllib; "
        f"files = sorted(glob.glob('{os_root}/usr/lib/bootc/kargs.d/*.toml')); "
        "print(' '.join(a for f in files for a in tomllib.load(open(f, 'rb'))['kargs']))"
    )
    script = f"""
set -e
. {os_root}/usr/lib/os-release
uuid=$(findmnt -n -o UUID {physical})
entry="bootc_$(printf %s "$ID" | tr - _)-$VERSION_ID-1.conf"
options="root=UUID=$uuid rw composefs={prefix}{image_id} $(python3 -c "{kargs}") {extra}"
cat > "{ESP}/loader/entries/$entry" <<EOF
title $PRETTY_NAME
version $VERSION_ID
linux /EFI/Linux/bootc_composefs-{kernel_id}/vmlinuz
initrd /EFI/Linux/bootc_composefs-{kernel_id}/initrd
options $options
sort-key bootc-$ID-0
EOF
sed -i "s/^default .*/default $entry/" {ESP}/loader/loader.conf
sync -f {ESP}
printf '%s\\n%s\\n' "$entry" "$options"
"""
    entry, options = vm.run(script).stdout.strip().splitlines()
    return Deployment(image_id, entry, options)


def deploy_by_hand(vm: Machine, disk: Disk, ref: str, secure: bool) -> Deployment:
    """The minimum of a composefs install, in the running plain-booted guest (its / is the
    physical root): pull into the bootc store, import zero-copy, the state directory, the kernel
    on the ESP, the default BLS entry. `install to-filesystem` replaces this."""
    cfs = ["bootc-unified", "internals", "cfs", "--repo", REPO]
    pull = ["bootc-unified", "image", "pull", "--sysroot", "/", "--tls-verify", "false", ref]
    vm.run(pull, timeout=vm.timeout(900))
    vm.run([*cfs, "init", *([] if secure else ["--insecure"])])
    imported = json.loads(
        vm.run([*cfs, "import", "--zerocopy", "--storage", STORE, ref], timeout=vm.timeout(1800)).stdout
    )
    assert imported["objects"]["copied"]["objects"] == 0, imported
    return write_deployment(vm, disk, imported["image_id"], secure)


def write_deployment(vm: Machine, disk: Disk, image_id: str, secure: bool) -> Deployment:
    """deploy_by_hand's second half, for an imported image: state, kernel, default entry."""
    cfs = ["bootc-unified", "internals", "cfs", "--repo", REPO]
    image = f"{WORK}/image"
    vm.run(f"mkdir -p {image}")
    vm.run([*cfs, "mount", image_id, image])
    mount_esp(vm, disk)
    try:
        vm.run(
            f"""
set -e
state=/state/deploy/{image_id}
mkdir -p "$state" /state/os/default
cp -a {image}/etc "$state/etc"
rm -f "$state/etc/.updated"
[ -d /state/os/default/var ] || cp -a {image}/var /state/os/default/var
ln -sfn ../../os/default/var "$state/var"
kernel={ESP}/EFI/Linux/bootc_composefs-{image_id}
mkdir -p "$kernel"
modules=$(echo {image}/usr/lib/modules/*)
cp "$modules/vmlinuz" "$kernel/vmlinuz"
cp "$modules/initramfs.img" "$kernel/initrd"
""",
            timeout=vm.timeout(300),
        )
        prefix = "" if secure else "?"
        extra = console_kargs(disk.base.cmdline)
        return write_default_entry(vm, image, "/", image_id, image_id, prefix, extra)
    finally:
        vm.run(f"umount {image}; umount {ESP}; sync", check=False)


def loader_entry_selected(vm: Machine) -> str:
    script = (
        "import glob; p = glob.glob('/sys/firmware/efi/efivars/LoaderEntrySelected-*')[0]; "
        "print(open(p, 'rb').read()[4:].decode('utf-16-le').rstrip('\\0'))"
    )
    return vm.run(["python3", "-c", script]).stdout.strip()


def check_composefs_root(vm: Machine, fs: str, disk: Disk, deployment: Deployment) -> None:
    source, fstype, options = vm.run("findmnt -n -o SOURCE,FSTYPE,OPTIONS /").stdout.split()
    assert (source, fstype) == (f"composefs:{deployment.image_id}", "overlay")
    opts = options.split(",")
    assert "ro" in opts and "metacopy=on" in opts and "redirect_dir=on" in opts, options
    assert ("verity=require" in opts) == VERITY[fs], options
    assert not vm.run("losetup --list --noheadings").stdout.strip(), "the EROFS must not need a loop device"
    cmdline = vm.run("cat /proc/cmdline").stdout.split()
    assert TEST_KARG in cmdline and f"composefs={'' if VERITY[fs] else '?'}{deployment.image_id}" in cmdline
    assert loader_entry_selected(vm) == deployment.entry
    assert vm.run(". /etc/os-release && echo $ID $VERSION_ID").stdout.split() == ["bootc-unified", "1"]
    assert vm.run("cat /usr/lib/bootc-unified/version").stdout.strip() == "v1"

    touched = vm.run("touch /usr/bootc-unified-probe", check=False)
    assert not touched.ok and "Read-only file system" in touched.stderr, touched

    # /sysroot: the physical root (same filesystem UUID as root=), read-only, with the repository.
    sysroot = vm.run("findmnt -n -o FSTYPE,OPTIONS,UUID /sysroot").stdout.split()
    assert sysroot[0] == fs and "ro" in sysroot[1].split(","), sysroot
    assert f"root=UUID={sysroot[2]}" in cmdline
    assert vm.run(f"test -e /sysroot/composefs/images/{deployment.image_id}", check=False).ok
    touched = vm.run("touch /sysroot/bootc-unified-probe", check=False)
    assert not touched.ok and "Read-only file system" in touched.stderr, touched

    # /etc and /var are the deployment's state: a write shows up there (through /sysroot).
    state = f"/sysroot/state/deploy/{deployment.image_id}"
    assert vm.run("findmnt -n -o OPTIONS /etc").stdout.startswith("rw")
    assert vm.run("findmnt -n -o OPTIONS /var").stdout.startswith("rw")
    vm.run("echo etc-$(cat /proc/sys/kernel/random/boot_id) > /etc/bootc-unified-marker")
    vm.run("echo var-$(cat /proc/sys/kernel/random/boot_id) > /var/lib/bootc-unified-marker")
    assert (
        vm.run(f"cat {state}/etc/bootc-unified-marker").stdout
        == vm.run("cat /etc/bootc-unified-marker").stdout
    )
    assert (
        vm.run("cat /sysroot/state/os/default/var/lib/bootc-unified-marker").stdout
        == vm.run("cat /var/lib/bootc-unified-marker").stdout
    )


def check_podman_sees_store(vm: Machine, ref: str) -> None:
    """The image's podman (no flags) lists the bootc store's image: /etc/containers/storage.conf
    names /usr/lib/bootc/storage -> /sysroot/ostree/bootc/storage as an additional image store."""
    listed = vm.run(
        ["podman", "images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"], timeout=vm.timeout(120)
    )
    ids = dict(line.split() for line in listed.stdout.splitlines())
    assert ref in ids, listed.stdout
    # The store's own record, read without podman.
    store = f"/sysroot{STORE}"
    inspected = json.loads(
        vm.run(["bootc-unified", "internals", "cstor", "--storage", store, "inspect", ref]).stdout
    )
    assert inspected["id"].startswith(ids[ref]), (inspected["id"], ids[ref])


@contextmanager
def bare_machine(request: pytest.FixtureRequest, disk: Disk, accel: Accel, key: KeyPair) -> Iterator[Machine]:
    """A machine outside vm_factory (whose teardown fails on a console panic): this one is
    expected to stop in the initramfs. Artifacts go to <test>/negative/."""
    name = f"bootc-unified-negative-{time.monotonic_ns() % 10**9}"
    workdir = disk.path.parent.parent / "vm" / name
    spec = MachineSpec(
        name=name,
        disk=disk.path,
        workdir=workdir,
        accel=accel,
        firmware=find_firmware(),
        ssh_port=free_port(),
        ssh_key=key.private,
    )
    machine = create(backend_for(request.config, disk.fs), spec)
    try:
        yield machine
    finally:
        machine.save_artifacts(artifacts_dir(request) / "negative")
        machine.destroy()


def test_boot_composefs(
    fs_kind: str,
    disk: Disk,
    vm: Machine,
    guest_image: GuestImages,
    registry: Registry,
    accel: Accel,
    ssh_keypair: KeyPair,
    request: pytest.FixtureRequest,
) -> None:
    timings: dict[str, float | str] = {"fs": fs_kind, "backend": vm.backend, "accel": vm.spec.accel.name}
    timings["plain_boot_to_ssh"] = vm.timings.boots_to_ssh[-1]
    # The plain boot: the initramfs script did nothing; the unit gave /sysroot and the store.
    assert vm.run("findmnt -n -o FSTYPE /").stdout.strip() == fs_kind
    assert "ro" in vm.run("findmnt -n -o OPTIONS /sysroot").stdout.split(",")
    vm.run("podman images")

    ref = guest_image.push("v1", registry)
    started = time.monotonic()
    deployment = deploy_by_hand(vm, disk, ref, VERITY[fs_kind])
    timings["deploy_by_hand"] = time.monotonic() - started

    reboot = vm.reboot()
    timings["reboot_into_composefs"] = reboot.seconds
    check_composefs_root(vm, fs_kind, disk, deployment)
    check_podman_sees_store(vm, ref)
    etc_marker = vm.run("cat /etc/bootc-unified-marker").stdout
    var_marker = vm.run("cat /var/lib/bootc-unified-marker").stdout

    # A power cycle: the composefs boot measured as the plain one was (start -> SSH).
    vm.poweroff()
    timings["composefs_boot_to_ssh"] = vm.boot()
    assert vm.run("findmnt -n -o SOURCE /").stdout.strip() == f"composefs:{deployment.image_id}"
    assert vm.run("cat /etc/bootc-unified-marker").stdout == etc_marker
    assert vm.run("cat /var/lib/bootc-unified-marker").stdout == var_marker

    # Negative: the default entry names an image the repository does not have.
    mount_esp(vm, disk)
    bad = write_default_entry(
        vm, "", "/sysroot", MISSING_ID, deployment.image_id, "", console_kargs(disk.base.cmdline)
    )
    assert bad.entry == deployment.entry  # same os-release: it replaces the good entry
    vm.run(f"umount {ESP}")
    vm.poweroff()
    expected = f"bootc-unified: composefs image /root/composefs/images/{MISSING_ID} is missing"
    with bare_machine(request, disk, accel, ssh_keypair) as machine:
        machine.start()
        deadline = time.monotonic() + machine.timeout(NEGATIVE_WAIT)
        while expected not in machine.console_text() and time.monotonic() < deadline:
            time.sleep(2)
        time.sleep(2)  # the shell prompt follows the line
        text = machine.console_text()
    lines = [line.strip() for line in text.splitlines()]
    assert lines.count(expected) == 1 and text.count(expected) == 1, f"expected one line {expected!r}"
    assert "initramfs shell" in {f.what for f in scan(text)}, "the boot should stop in the initramfs"
    assert "bootc-unified: composefs root" not in text

    out_dir = artifacts_dir(request)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(json.dumps(timings))
