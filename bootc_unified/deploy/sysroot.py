"""Paths on the physical root and the ESP, and which deployment is booted.

The booted id is the mount source of `/` in /proc/self/mountinfo: `composefs:<id>` (what the
initramfs sets), or `transient:composefs=<id>` for a transient root (bootc `BC/status.rs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bootc_unified.errors import UserError

MOUNTINFO = Path("/proc/self/mountinfo")
ESP_CANDIDATES = (Path("/boot/efi"), Path("/efi"), Path("/boot"))
KERNEL_DIR_PREFIX = "bootc_composefs-"


@dataclass(frozen=True)
class Sysroot:
    """The physical root (`/sysroot` on a booted system, the target during install)."""

    root: Path

    @property
    def repo(self) -> Path:
        return self.root / "composefs"

    @property
    def store(self) -> Path:
        return self.root / "ostree" / "bootc" / "storage"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def deploy_dir(self) -> Path:
        return self.state / "deploy"

    def deployment(self, depl_id: str) -> Path:
        return self.deploy_dir / depl_id

    def origin(self, depl_id: str) -> Path:
        return self.deployment(depl_id) / f"{depl_id}.origin"

    @property
    def shared_var(self) -> Path:
        return self.state / "os" / "default" / "var"

    def on_read_only_medium(self, sys_block: Path = Path("/sys/dev/block")) -> bool:
        """bootc's `status.readOnly`: the physical root is mounted read-only and its block device
        is read-only too (a live ISO). A read-only mount of a writable device is the normal
        state of /sysroot, and a filesystem with no block device of its own (btrfs's anonymous
        device numbers) counts as writable, as in bootc."""
        try:
            if not os.statvfs(self.root).f_flag & os.ST_RDONLY:
                return False
            dev = os.stat(self.root).st_dev
            flag = (sys_block / f"{os.major(dev)}:{os.minor(dev)}" / "ro").read_text()
        except OSError:
            return False
        return flag.strip() == "1"


@dataclass(frozen=True)
class Esp:
    """The EFI system partition (mounted), where systemd-boot reads entries and kernels."""

    root: Path

    @property
    def entries(self) -> Path:
        return self.root / "loader" / "entries"

    @property
    def entries_staged(self) -> Path:
        return self.root / "loader" / "entries.staged"

    @property
    def loader_conf(self) -> Path:
        return self.root / "loader" / "loader.conf"

    @property
    def linux(self) -> Path:
        return self.root / "EFI" / "Linux"

    def kernel_dir(self, name_id: str) -> Path:
        return self.linux / f"{KERNEL_DIR_PREFIX}{name_id}"

    def kernel_dirs(self) -> list[Path]:
        if not self.linux.is_dir():
            return []
        return sorted(p for p in self.linux.iterdir() if p.name.startswith(KERNEL_DIR_PREFIX) and p.is_dir())


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts(mountinfo: Path = MOUNTINFO) -> list[tuple[str, str, str]]:
    """(mount point, fs type, source) per line of a mountinfo file."""
    try:
        text = mountinfo.read_text()
    except OSError as e:
        raise UserError(f"{mountinfo}: {e.strerror}") from e
    return parse_mountinfo(text, str(mountinfo))


def parse_mountinfo(text: str, name: str = "mountinfo") -> list[tuple[str, str, str]]:
    """`mounts()` of a mountinfo's text; errors name `name`."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if "-" not in fields:
            raise UserError(f"{name}:{n}: not a mountinfo line")
        sep = fields.index("-")
        if len(fields) < sep + 3 or sep < 5:
            raise UserError(f"{name}:{n}: not a mountinfo line")
        out.append((_unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2])))
    return out


def booted_id(mountinfo: Path = MOUNTINFO) -> str | None:
    """The deployment id of `/` from its mount source, or None when `/` is not a composefs mount."""
    source = None
    for point, _fstype, src in mounts(mountinfo):
        if point == "/":
            source = src  # the last mount on / is the visible one
    if source is None:
        return None
    for prefix in ("composefs:", "transient:composefs="):
        if source.startswith(prefix):
            return source.removeprefix(prefix).removeprefix("?")
    return None


def find_esp(mountinfo: Path = MOUNTINFO) -> Path | None:
    """The mounted vfat at /boot/efi, /efi or /boot (first found), as a booted system has it."""
    vfat = {point for point, fstype, _ in mounts(mountinfo) if fstype in ("vfat", "msdos")}
    for candidate in ESP_CANDIDATES:
        if str(candidate) in vfat:
            return candidate
    return None


ESP_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
ESP_MOUNT = Path("/run/bootc-unified/esp")


def esp_partition(physical_root: Path) -> str | None:
    """The ESP (GPT type EFI System) on the disk that holds `physical_root`, as a /dev path."""
    import json
    import subprocess

    source = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", "--target", str(physical_root)], capture_output=True, text=True
    ).stdout.strip()
    device = source.split("[")[0]
    if not device.startswith("/dev/"):
        return None
    disk = subprocess.run(["lsblk", "-n", "-d", "-o", "PKNAME", device], capture_output=True, text=True)
    if disk.returncode != 0 or not disk.stdout.strip():
        return None
    listing = subprocess.run(
        ["lsblk", "-J", "-o", "PATH,PARTTYPE", f"/dev/{disk.stdout.strip()}"], capture_output=True, text=True
    )
    if listing.returncode != 0:
        return None
    for dev in json.loads(listing.stdout).get("blockdevices", []):
        for part in [dev, *dev.get("children", [])]:
            if (part.get("parttype") or "").lower() == ESP_TYPE:
                return str(part["path"])
    return None


ESP_CHECK_UNIT = "bootc-unified-esp-fsck.service"


def wait_for_esp_check(run: Path = Path("/run/systemd/system")) -> None:
    """On a booted system (systemd), the boot's ESP check done before the ESP is mounted: start
    bootc-unified-esp-fsck.service and wait for it (a no-op once it ran this boot, or where its
    condition, a composefs boot, does not hold). The boot does not wait for it; the first mount
    does. Its failure is the unit's to report (journal, failed unit): the mount goes on, as it
    did before the check existed, and fails by itself when the ESP is unreadable."""
    import subprocess

    if not run.is_dir():
        return  # no systemd (a container, an installer chroot): nothing checks the ESP at boot
    try:
        subprocess.run(["systemctl", "start", ESP_CHECK_UNIT], capture_output=True, check=False)
    except FileNotFoundError:
        return


def default_esp(mountinfo: Path = MOUNTINFO, physical_root: Path = Path("/sysroot")) -> Path:
    """The mounted ESP; when none is, the ESP of the physical root's disk mounted at
    /run/bootc-unified/esp (as bootc mounts it on demand)."""
    esp = find_esp(mountinfo)
    if esp is not None:
        return esp
    if str(ESP_MOUNT) in {point for point, _, _ in mounts(mountinfo)}:
        return ESP_MOUNT
    device = esp_partition(physical_root)
    if device is None:
        raise UserError("no EFI system partition mounted (vfat at /boot/efi, /efi or /boot); pass --esp DIR")
    import subprocess

    wait_for_esp_check()
    ESP_MOUNT.mkdir(parents=True, exist_ok=True)
    options = "noexec,nosuid,nodev,fmask=0177,dmask=0077"
    proc = subprocess.run(
        ["mount", "-t", "vfat", "-o", options, device, str(ESP_MOUNT)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"{device}: cannot mount the ESP at {ESP_MOUNT}: {last}")
    return ESP_MOUNT


# Filesystems whose kernel support for fs-verity bootc counts on; elsewhere (XFS) verity is optional.
VERITY_FILESYSTEMS = ("ext4", "btrfs")


def fs_type(path: Path) -> str | None:
    """The type of the filesystem holding `path` (the longest mountinfo mount point above it)."""
    best: tuple[int, str] | None = None
    target = str(Path(path).resolve())
    for point, fstype, _src in mounts():
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > best[0]):
            best = (len(point), fstype)
    return best[1] if best else None


def fs_uuid(path: Path) -> str | None:
    """The UUID of the filesystem holding `path` (findmnt for its device, blkid for the UUID);
    None when not findable (no device, or no tool)."""
    import subprocess

    try:
        source = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE", "--target", str(path)], capture_output=True, text=True
        ).stdout.strip()
        if not source.startswith("/dev/"):
            return None
        proc = subprocess.run(
            ["blkid", "-o", "value", "-s", "UUID", source.split("[")[0]], capture_output=True, text=True
        )
    except FileNotFoundError:
        return None
    return proc.stdout.strip() or None
