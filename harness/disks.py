"""Raw GPT disks: an EFI system partition with systemd-boot and a BLS entry, and a root partition
(btrfs, XFS with reflink, or ext4 with the verity feature) holding a guest image's filesystem.

The host cannot scan partitions (`losetup -P`) nor mount vfat, so the root filesystem is made on
an offset loop device (`losetup --offset --sizelimit`) and the ESP with `mkfs.vfat --offset` plus
mtools. Base disks are cached read-only in `<cache>/disks/`, keyed by the image ID, the filesystem
and the layout; every VM boots a qcow2 overlay on top (`overlay()`), so VMs never share writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.cache import digest, file_lock, subdir
from harness.images import GuestImage, ImageBuilder
from harness.loopfs import KINDS, MKFS
from harness.run import CommandError, run

MiB = 1 << 20
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_FS_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
UUID_NAMESPACE = uuid.UUID("6b1d3c0e-5a43-4f0e-9d4b-8c2f1f0b7a11")
STALE_AFTER = 6 * 3600.0  # base disks unused this long go when a new one of the kind is built
SYSTEMD_BOOT = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi"  # read from the image, not the host


@dataclass(frozen=True)
class Layout:
    esp_size: int = 512 * MiB
    root_size: int = 12 * 1024 * MiB
    first: int = 1 * MiB  # partition alignment

    @property
    def esp_offset(self) -> int:
        return self.first

    @property
    def root_offset(self) -> int:
        return self.first + self.esp_size

    @property
    def disk_size(self) -> int:
        return self.root_offset + self.root_size + self.first  # room for the backup GPT


@dataclass(frozen=True)
class BaseDisk:
    path: Path
    fs: str
    variant: str
    image_id: str
    esp_partuuid: str
    root_partuuid: str
    cmdline: str
    layout: Layout
    built_seconds: float = 0.0


def missing_prerequisites(fs: str) -> list[str]:
    tools = ["sfdisk", "losetup", "mount", "umount", "mkfs.vfat", "mmd", "mcopy", "qemu-img", MKFS[fs][0]]
    problems = [f"{t} not found" for t in tools if shutil.which(t) is None]
    if os.geteuid() != 0:
        problems.append("not root")
    return problems


# Every base disk's kernel arguments besides root= and rootfstype=. no_timer_check: under TCG on a
# loaded host the kernel's early check of the IO-APIC timer can miss its ticks and panic ("IO-APIC +
# timer doesn't work!", seen here with two VMs and the storage tier on two cores); Fedora's cloud
# images boot with it for that reason.
KERNEL_ARGS = (
    "rw",
    "console=ttyS0,115200",
    "systemd.firstboot=off",
    "systemd.journald.forward_to_console=0",
    "no_timer_check",
)


def kernel_cmdline(fs: str, root_partuuid: str) -> str:
    return " ".join([f"root=PARTUUID={root_partuuid}", f"rootfstype={fs}", *KERNEL_ARGS])


def build_base_disk(builder: ImageBuilder, image: GuestImage, fs: str, layout: Layout = Layout()) -> BaseDisk:
    """The cached base disk for `image` on `fs`, building it (under a lock) when missing."""
    if fs not in KINDS:
        raise ValueError(f"unknown filesystem {fs!r}; choose from {', '.join(KINDS)}")
    key = digest("disk-v1", fs, image.image_id, json.dumps(asdict(layout)), *KERNEL_ARGS)
    directory = subdir("disks")
    path, meta = directory / f"{image.variant}-{fs}-{key}.raw", directory / f"{image.variant}-{fs}-{key}.json"
    with file_lock(f"disk-{key}"):
        if path.is_file() and meta.is_file():
            meta.touch()  # last use, for prune_stale()
            data = json.loads(meta.read_text())
            return BaseDisk(path=path, fs=fs, layout=layout, **data)
        prune_stale(directory, f"{image.variant}-{fs}-")
        started = time.monotonic()
        esp_uuid = str(uuid.uuid5(UUID_NAMESPACE, f"{key}-esp"))
        root_uuid = str(uuid.uuid5(UUID_NAMESPACE, f"{key}-root"))
        cmdline = kernel_cmdline(fs, root_uuid)
        part = path.with_suffix(".part")
        part.unlink(missing_ok=True)
        try:
            with builder.rootfs(image) as rootfs:
                _partition(part, layout, esp_uuid, root_uuid)
                _fill_root(part, layout, fs, rootfs)
                _fill_esp(part, layout, rootfs, image.variant, cmdline)
            part.chmod(0o444)
            data = {
                "variant": image.variant,
                "image_id": image.image_id,
                "esp_partuuid": esp_uuid,
                "root_partuuid": root_uuid,
                "cmdline": cmdline,
            }
            meta.write_text(json.dumps(data, indent=2) + "\n")
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)
        return BaseDisk(path=path, fs=fs, layout=layout, built_seconds=time.monotonic() - started, **data)


def prune_stale(directory: Path, prefix: str, max_age: float = STALE_AFTER) -> None:
    """Delete base disks named `prefix*` not used for `max_age` seconds (older sources, images)."""
    now = time.time()
    for meta in directory.glob(f"{prefix}*.json"):
        if now - meta.stat().st_mtime > max_age:
            meta.with_suffix(".raw").unlink(missing_ok=True)
            meta.unlink(missing_ok=True)


def overlay(base: BaseDisk, dest: Path) -> Path:
    """A fresh qcow2 overlay backed by the (read-only) base disk."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.path, "-F", "raw", dest])
    return dest


def _partition(path: Path, layout: Layout, esp_uuid: str, root_uuid: str) -> None:
    with open(path, "wb") as f:
        f.truncate(layout.disk_size)
    sector = 512
    script = "\n".join(
        [
            "label: gpt",
            "unit: sectors",
            f"start={layout.esp_offset // sector}, size={layout.esp_size // sector}, type={ESP_TYPE}, "
            f'uuid={esp_uuid}, name="esp"',
            f"start={layout.root_offset // sector}, size={layout.root_size // sector}, type={LINUX_FS_TYPE}, "
            f'uuid={root_uuid}, name="root"',
            "",
        ]
    )
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", path], input=script.encode())


def _fill_root(path: Path, layout: Layout, fs: str, rootfs: Path) -> None:
    device = run(
        [
            "losetup",
            "--find",
            "--show",
            "--offset",
            str(layout.root_offset),
            "--sizelimit",
            str(layout.root_size),
            path,
        ]
    ).stdout.strip()
    try:
        run([*MKFS[fs], "-L", "root", device])
        with tempfile.TemporaryDirectory(prefix="bootc-unified-root-") as mnt:
            run(["mount", device, mnt])
            try:
                run(["cp", "-a", f"{rootfs}/.", f"{mnt}/"], timeout=1800)
                run(["sync", "-f", mnt])
            finally:
                try:
                    run(["umount", mnt])
                except CommandError:
                    run(["umount", "-l", mnt], check=False)
    finally:
        run(["losetup", "-d", device], check=False)


def _fill_esp(path: Path, layout: Layout, rootfs: Path, variant: str, cmdline: str) -> None:
    run(
        [
            "mkfs.vfat",
            *("-F", "32", "-s", "8", "-S", "512"),  # sizes from the ESP, not from the whole file
            "-n",
            "ESP",
            f"--offset={layout.esp_offset // 512}",
            path,
            str(layout.esp_size // 1024),
        ]
    )
    img = f"{path}@@{layout.esp_offset}"
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise FileNotFoundError(f"no kernel in the image's /boot ({rootfs})")
    kernel = kernels[-1]
    version = kernel.name.removeprefix("vmlinuz-")
    initrd = rootfs / "boot" / f"initrd.img-{version}"
    if not initrd.is_file():
        raise FileNotFoundError(f"no initrd for kernel {version} in the image's /boot")
    entry_dir = f"/bootc-unified/{variant}"
    loader_conf = "timeout 0\ndefault bootc-unified-*\nconsole-mode keep\n"
    entry = "\n".join(
        [
            f"title bootc-unified {variant} ({version})",
            f"version {version}",
            f"linux {entry_dir}/vmlinuz",
            f"initrd {entry_dir}/initrd.img",
            f"options {cmdline}",
            "",
        ]
    )
    with tempfile.TemporaryDirectory(prefix="bootc-unified-esp-") as tmp:
        (Path(tmp) / "loader.conf").write_text(loader_conf)
        (Path(tmp) / "entry.conf").write_text(entry)
        mtools_env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        dirs = [
            "::/EFI",
            "::/EFI/BOOT",
            "::/loader",
            "::/loader/entries",
            "::/bootc-unified",
            f"::{entry_dir}",
        ]
        for directory in dirs:  # one at a time: mmd does not see a parent it made in the same call
            run(["mmd", "-i", img, directory], env=mtools_env)
        copies = [
            (rootfs / SYSTEMD_BOOT.lstrip("/"), "::/EFI/BOOT/BOOTX64.EFI"),
            (Path(tmp) / "loader.conf", "::/loader/loader.conf"),
            (Path(tmp) / "entry.conf", f"::/loader/entries/bootc-unified-{variant}.conf"),
            (kernel, f"::{entry_dir}/vmlinuz"),
            (initrd, f"::{entry_dir}/initrd.img"),
        ]
        for src, dst in copies:
            run(["mcopy", "-i", img, src, dst], env=mtools_env)
