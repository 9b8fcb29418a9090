"""`install to-disk DEVICE`: pre-flight checks, GPT partitioning, filesystems, then to-filesystem.

Pre-flight (nothing is written to the device before all pass): the filesystem is one we make
(ext4 with `-O verity`, XFS with `-m reflink=1`, btrfs) and its mkfs is installed; DEVICE is a block
device; neither it nor any of its partitions is mounted, used as swap, or held by another device
(/proc/self/mountinfo major:minor, /proc/swaps, /sys/dev/block/M:N/holders); it holds no partitions
or signatures (wipefs) unless `--wipe` says to erase them; it is large enough for
the ESP, the image twice over (store + repository in the worst case) and some room.

Layout (bootc `install/baseline.rs`, composefs sizes): GPT, `EFI-SYSTEM` 1 GiB vfat, `root` with the
x86-64 root partition type (Discoverable Partitions) over the rest, filesystem label `root`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bootc_unified.deploy.install import (
    CONTAINERENV,
    HOST_STORAGE,
    InstallResult,
    InstallToFilesystemOpts,
    _scratch_dir,
    host_storage_env,
    install_to_filesystem,
    source_ref,
)
from bootc_unified.deploy.spec import ImageReference
from bootc_unified.errors import UserError
from bootc_unified.progress import Progress

MiB = 1 << 20
GiB = 1 << 30
ESP_SIZE = GiB
ROOM = 512 * MiB  # /var, /etc copies, repository metadata
ESP_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
ROOT_TYPE_X86_64 = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
MKFS: dict[str, list[str]] = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-O", "verity", "-L", "root"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1", "-L", "root"],
    "btrfs": ["mkfs.btrfs", "-q", "-f", "-L", "root"],
}
MKFS_VFAT = ["mkfs.vfat", "-F", "32", "-n", "EFI-SYSTEM"]


@dataclass(frozen=True)
class InstallToDiskOpts:  # bootc cli.rs InstallToDiskOpts (the flags we take)
    device: Path
    filesystem: str = "ext4"
    wipe: bool = False
    karg: tuple[str, ...] = ()
    source_imgref: str | None = None
    target_imgref: str | None = None
    target_transport: str = "registry"
    experimental_unified_storage: bool = False
    allow_missing_verity: bool = False
    tls_verify: bool = True
    progress_fd: int | None = None

    def to_filesystem(self, root: Path, esp: Path) -> InstallToFilesystemOpts:
        return InstallToFilesystemOpts(
            root=root,
            boot_esp=esp,
            karg=self.karg,
            source_imgref=self.source_imgref,
            target_imgref=self.target_imgref,
            target_transport=self.target_transport,
            experimental_unified_storage=self.experimental_unified_storage,
            allow_missing_verity=self.allow_missing_verity,
            tls_verify=self.tls_verify,
            progress_fd=self.progress_fd,
        )


# --- pre-flight ---------------------------------------------------------------------------------------


def check_filesystem(name: str) -> None:
    if name not in MKFS:
        raise UserError(f"--filesystem {name}: unknown filesystem (choose from {', '.join(sorted(MKFS))})")
    for tool in (MKFS[name][0], MKFS_VFAT[0], "sfdisk"):
        if shutil.which(tool) is None:
            raise UserError(f"{tool} not found (needed to install onto a {name} disk)")


def block_device(device: Path) -> tuple[int, int]:
    """(major, minor) of `device`; UserError when it is not a block device."""
    try:
        st = os.stat(device)
    except OSError as e:
        raise UserError(f"{device}: {e.strerror}") from e
    if not stat.S_ISBLK(st.st_mode):
        raise UserError(f"{device}: not a block device")
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def sys_dir(devnum: tuple[int, int]) -> Path:
    return Path(f"/sys/dev/block/{devnum[0]}:{devnum[1]}").resolve()


def _devnum(sysdir: Path) -> tuple[int, int]:
    major, minor = (sysdir / "dev").read_text().strip().split(":")
    return int(major), int(minor)


def partitions(devnum: tuple[int, int]) -> dict[tuple[int, int], str]:
    """The device and its partitions: (major, minor) -> kernel name."""
    top = sys_dir(devnum)
    found = {devnum: top.name}
    for child in top.iterdir():
        if (child / "partition").exists():
            found[_devnum(child)] = child.name
    return found


def in_use(devnum: tuple[int, int], mountinfo: Path = Path("/proc/self/mountinfo")) -> str | None:
    """Why the device (or a partition of it) is busy, or None."""
    parts = partitions(devnum)
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        major, minor = fields[2].split(":")
        name = parts.get((int(major), int(minor)))
        if name is not None:
            return f"{name} is mounted at {fields[4]}"
    swaps = Path("/proc/swaps")
    if swaps.exists():
        for line in swaps.read_text().splitlines()[1:]:
            with contextlib.suppress(OSError):
                st = os.stat(line.split()[0])
                name = parts.get((os.major(st.st_rdev), os.minor(st.st_rdev)))
                if name is not None:
                    return f"{name} is in use as swap"
    for num, name in parts.items():
        holders = sys_dir(num) / "holders"
        held = sorted(os.listdir(holders)) if holders.is_dir() else []
        if held:
            return f"{name} is held by {', '.join(held)}"
    return None


def signatures(device: Path, devnum: tuple[int, int]) -> list[str]:
    """What is already on the device: partitions, and signatures wipefs finds (partition tables,
    filesystems, RAID, LVM)."""
    found = [f"partition {name}" for num, name in sorted(partitions(devnum).items()) if num != devnum]
    proc = subprocess.run(
        ["wipefs", "--noheadings", "--output", "TYPE", str(device)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise UserError(f"{device}: wipefs: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    found += sorted({line.strip() for line in proc.stdout.splitlines() if line.strip()})
    return found


def device_size(devnum: tuple[int, int]) -> int:
    return int((sys_dir(devnum) / "size").read_text()) * 512


def image_size(source: ImageReference, tls_verify: bool) -> int:
    """The image's size as its source reports it (registry: compressed layers, times two for
    unpacking; containers-storage: podman's size)."""
    if source.transport == "containers-storage":
        argv = ["podman", "--root", str(HOST_STORAGE), "image", "inspect", "--format", "{{.Size}}"]
        argv.append(source.image)
        proc = subprocess.run(argv, capture_output=True, text=True, env=host_storage_env(HOST_STORAGE))
        if proc.returncode != 0:
            raise UserError(f"containers-storage:{source.image}: no such image in host storage")
        return int(proc.stdout.strip() or 0)
    transport = "docker://" if source.transport == "registry" else f"{source.transport}:"
    argv = ["skopeo", "inspect", "--raw", f"--tls-verify={'true' if tls_verify else 'false'}"]
    proc = subprocess.run([*argv, transport + source.image], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"{transport}{source.image}: cannot inspect ({last})")
    try:
        manifest = json.loads(proc.stdout)
        return 2 * sum(int(layer["size"]) for layer in manifest.get("layers", []))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{transport}{source.image}: unreadable manifest ({e})") from e


def preflight(opts: InstallToDiskOpts, containerenv: Path | None = None) -> int:
    """All checks before anything touches the device; returns the bytes needed."""
    check_filesystem(opts.filesystem)
    devnum = block_device(opts.device)
    busy = in_use(devnum)
    if busy:
        raise UserError(f"{opts.device}: in use ({busy})")
    existing = signatures(opts.device, devnum)
    if existing and not opts.wipe:
        raise UserError(f"{opts.device}: holds data ({', '.join(existing)}); pass --wipe to erase it")
    fs_opts = opts.to_filesystem(Path("/"), Path("/"))
    source = source_ref(fs_opts, containerenv or CONTAINERENV)
    need = ESP_SIZE + ROOM + 2 * image_size(source, opts.tls_verify)
    have = device_size(devnum)
    if have < need:
        raise UserError(
            f"{opts.device}: {have // MiB} MiB is too small; installing needs at least {need // MiB} MiB "
            f"({ESP_SIZE // MiB} MiB ESP + twice the image + {ROOM // MiB} MiB)"
        )
    return need


# --- partitioning and install -----------------------------------------------------------------------


def _run(argv: list[str], what: str, stdin: str | None = None) -> None:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise UserError(f"{what}: {argv[0]}: {last}")


def partition_nodes(devnum: tuple[int, int], timeout: float = 10.0) -> tuple[Path, Path]:
    """/dev nodes of partitions 1 (ESP) and 2 (root), waiting for udev."""
    deadline = time.monotonic() + timeout
    while True:
        by_number: dict[int, str] = {}
        top = sys_dir(devnum)
        for child in top.iterdir():
            if (child / "partition").exists():
                by_number[int((child / "partition").read_text())] = child.name
        nodes = [Path("/dev") / by_number[n] for n in (1, 2) if n in by_number]
        if len(nodes) == 2 and all(p.exists() for p in nodes):
            return nodes[0], nodes[1]
        if time.monotonic() > deadline:
            raise UserError(f"{top.name}: partitions did not appear (is partition scanning enabled?)")
        time.sleep(0.2)


def partition(device: Path, filesystem: str, wipe: bool = False) -> tuple[Path, Path]:
    devnum = block_device(device)
    if wipe:  # partitions' signatures first (they outlive a new table), then the device's own
        for num, name in sorted(partitions(devnum).items(), reverse=True):
            _run(["wipefs", "--all", "--quiet", f"/dev/{name}" if num != devnum else str(device)], name)
    script = (
        "label: gpt\n"
        f'size={ESP_SIZE // MiB}MiB, type={ESP_TYPE}, name="EFI-SYSTEM"\n'
        f'type={ROOT_TYPE_X86_64}, name="root"\n'
    )
    _run(["sfdisk", "--quiet", "--wipe", "always", str(device)], f"{device}", script)
    if shutil.which("udevadm"):
        subprocess.run(["udevadm", "settle"], capture_output=True)
    esp, root = partition_nodes(devnum)
    _run([*MKFS_VFAT, str(esp)], f"{esp}")
    _run([*MKFS[filesystem], str(root)], f"{root}")
    return esp, root


@contextlib.contextmanager
def _mounted(device: Path, mountpoint: Path, fstype: str | None = None) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    _run(["mount", *(["-t", fstype] if fstype else []), str(device), str(mountpoint)], f"{device}")
    try:
        yield mountpoint
    finally:
        os.sync()
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def install_to_disk(opts: InstallToDiskOpts, progress: Progress | None = None) -> InstallResult:
    preflight(opts)
    esp_dev, root_dev = partition(opts.device, opts.filesystem, opts.wipe)
    with (
        _scratch_dir("to-disk-") as scratch,
        _mounted(root_dev, scratch / "root") as root,
        _mounted(esp_dev, scratch / "esp", "vfat") as esp,
    ):
        return install_to_filesystem(opts.to_filesystem(root, esp), progress)
