"""Installed systems: `bootc-unified install to-disk` run the bootc way in an installer VM, and the
result cached as a base disk keyed by (image ID, filesystem, unified or not), so a scenario that
needs an installed system boots a qcow2 overlay of it in seconds instead of installing again.

The installer is any booted guest whose podman can reach the registry; the target is a blank
qcow2 attached as its second disk (/dev/vdb). The installed disk is self-contained: GPT, ESP with
systemd-boot and the BLS entry, root filesystem with the repository, the bootc store and state.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from harness.cache import digest, file_lock, subdir
from harness.vm import Machine

TARGET_SIZE = "16G"
# The installed system's console must reach the harness (its checks read the serial log).
KARGS = ("console=ttyS0,115200", "systemd.journald.forward_to_console=0")


@dataclass(frozen=True)
class InstalledBase:
    """A cached installed disk (read-only qcow2); `fs` as BaseDisk has it, for the VM fixtures."""

    path: Path
    fs: str
    image_id: str
    unified: bool


@dataclass(frozen=True)
class InstallRun:
    output: str
    seconds: float


def blank_disk(path: Path, size: str = TARGET_SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def install_command(ref: str, fs: str, unified: bool, device: str = "/dev/vdb") -> list[str]:
    """bootc's documented way: the image installs itself from a privileged container, reading the
    source image from the host's containers-storage (named in /run/.containerenv)."""
    return [
        *("podman", "run", "--rm", "--privileged", "--pid=host", "--security-opt", "label=disable"),
        *("-v", "/dev:/dev", "-v", "/var/lib/containers:/var/lib/containers", ref),
        *("bootc-unified", "install", "to-disk", "--filesystem", fs),
        *(["--experimental-unified-storage"] if unified else []),
        *(arg for k in KARGS for arg in ("--karg", k)),
        device,
    ]


def run_install(installer: Machine, ref: str, fs: str, unified: bool) -> InstallRun:
    """Pull `ref` with the installer's podman, then install it onto the installer's /dev/vdb."""
    installer.run(["podman", "pull", "--quiet", ref], timeout=installer.timeout(600))
    started = time.monotonic()
    out = installer.run(install_command(ref, fs, unified), timeout=installer.timeout(1800)).stdout
    return InstallRun(out, time.monotonic() - started)


def _path(image_id: str, fs: str, unified: bool) -> Path:
    mode = "unified" if unified else "direct"
    key = digest("installed-v1", image_id, fs, mode)
    return subdir("installed") / f"{fs}-{mode}-{key}.qcow2"


def cached(image_id: str, fs: str, unified: bool) -> InstalledBase | None:
    path = _path(image_id, fs, unified)
    if not path.is_file():
        return None
    os.utime(path)  # last use
    return InstalledBase(path, fs, image_id, unified)


def save(disk: Path, image_id: str, fs: str, unified: bool) -> InstalledBase:
    """Keep a powered-off installed disk as the cached base (a flattened, read-only copy)."""
    path = _path(image_id, fs, unified)
    with file_lock(f"installed-{path.stem}"):
        if not path.is_file():
            part = path.with_suffix(".part")
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(disk), str(part)], check=True)
            part.chmod(0o444)
            os.replace(part, path)
    return InstalledBase(path, fs, image_id, unified)


def overlay(base: InstalledBase, dest: Path) -> Path:
    """A fresh qcow2 overlay over the cached installed disk."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base.path), "-F", "qcow2", str(dest)]
    subprocess.run(argv, check=True)
    return dest
