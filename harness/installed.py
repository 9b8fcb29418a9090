"""Installed systems: `bootc-unified install to-disk` run the bootc way in an installer VM, and the
result cached as a base disk keyed by (image ID, filesystem, unified or not), so a scenario that
needs an installed system boots a qcow2 overlay of it in seconds instead of installing again.

The installer is any booted guest whose podman can reach the registry; the target is a blank
qcow2 attached as its second disk (/dev/vdb). The installed disk is self-contained: GPT, ESP with
systemd-boot and the BLS entry, root filesystem with the repository, the bootc store and state.

Registry names that outlive a session: the test registry's port changes every session, but a cached
disk keeps its `.origin` and its store's image names. So images are installed (and named in
`.origin`, `--target-imgref`) as `bootc-unified.test/<repo>:<tag>`, a reserved `.test` name, and
every guest that pulls maps that prefix to this session's registry with a registries.conf drop-in
(`map_test_registry`), the remapping a user of a mirror would write.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from harness.cache import digest, file_lock, subdir
from harness.vm import Machine

TARGET_SIZE = "16G"
# The installed system's console must reach the harness (its checks read the serial log);
# no_timer_check as for the base disks (harness/disks.py).
KARGS = ("console=ttyS0,115200", "systemd.journald.forward_to_console=0", "no_timer_check")
# Names every installed system and scenario uses for the test registry (RFC 2606 reserves .test).
TEST_REGISTRY = "bootc-unified.test"
MAPPING_CONF = "/etc/containers/registries.conf.d/60-bootc-unified-test.conf"


# The repository:tag each guest image variant is pushed as: v1 and v2 are one stream (an upgrade
# follows the tag), alt is another (switch), app and app2 are bound by v2 and alt.
REFERENCES = {
    "v1": "os:latest",
    "v2": "os:latest",
    "alt": "alt:latest",
    "app": "app:latest",
    "app2": "app2:latest",
}


def registry_ref(reference: str) -> str:
    """`os:latest` -> `bootc-unified.test/os:latest`, the name guests pull and origins keep."""
    return f"{TEST_REGISTRY}/{reference}"


def variant_ref(variant: str) -> str:
    """The `bootc-unified.test/...` name of a guest image variant (REFERENCES)."""
    return registry_ref(REFERENCES[variant])


def guest_registry(registry_address: str) -> str:
    """127.0.0.1:PORT (the host's view of the session registry) -> 10.0.2.2:PORT (a guest's view)."""
    return "10.0.2.2:" + registry_address.rsplit(":", 1)[1]


def mapping_conf(registry_address: str) -> str:
    return (
        "# written by the bootc-unified harness: the test registry of this session\n"
        "[[registry]]\n"
        f'prefix = "{TEST_REGISTRY}"\n'
        f'location = "{guest_registry(registry_address)}"\n'
        "insecure = true\n"
    )


def map_test_registry(vm: Machine, registry_address: str) -> None:
    """Point `bootc-unified.test/...` at this session's registry in the guest (MAPPING_CONF)."""
    text = mapping_conf(registry_address)
    vm.run(
        f"mkdir -p {shlex.quote(os.path.dirname(MAPPING_CONF))} && "
        f"printf %s {shlex.quote(text)} > {MAPPING_CONF}.tmp && mv {MAPPING_CONF}.tmp {MAPPING_CONF}"
    )


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
    source image from the host's containers-storage (named in /run/.containerenv); the origin
    follows `ref` (a `bootc-unified.test/...` name, valid in every session)."""
    return [
        *("podman", "run", "--rm", "--privileged", "--pid=host", "--security-opt", "label=disable"),
        *("-v", "/dev:/dev", "-v", "/var/lib/containers:/var/lib/containers", ref),
        *("bootc-unified", "install", "to-disk", "--filesystem", fs, "--target-imgref", ref),
        *(["--experimental-unified-storage"] if unified else []),
        *(arg for k in KARGS for arg in ("--karg", k)),
        device,
    ]


def run_install(installer: Machine, ref: str, fs: str, unified: bool, registry_address: str) -> InstallRun:
    """Pull `ref` (`bootc-unified.test/...`, mapped to the registry at `registry_address`) with the
    installer's podman, then install it onto the installer's /dev/vdb."""
    if not ref.startswith(f"{TEST_REGISTRY}/"):
        raise ValueError(f"{ref}: installed systems follow {TEST_REGISTRY}/... names (see registry_ref)")
    map_test_registry(installer, registry_address)
    installer.run(["podman", "pull", "--quiet", ref], timeout=installer.timeout(600))
    started = time.monotonic()
    out = installer.run(install_command(ref, fs, unified), timeout=installer.timeout(1800)).stdout
    return InstallRun(out, time.monotonic() - started)


def _path(image_id: str, fs: str, unified: bool) -> Path:
    mode = "unified" if unified else "direct"
    # v2: origins and store names are bootc-unified.test/... (--target-imgref), not a session's port
    key = digest("installed-v2", image_id, fs, mode, *KARGS)
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
