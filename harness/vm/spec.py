"""What a VM is made of, independent of the backend that runs it."""

from __future__ import annotations

import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from harness.vm.accel import Accel
from harness.vm.firmware import Firmware

# The guest's view of QEMU user networking: the host (and its loopback services) is 10.0.2.2.
HOST_ADDRESS_FROM_GUEST = "10.0.2.2"
# Safe in QEMU's option syntax (no commas) and in XML, and short enough for an SMBIOS string.
SERIAL_CHARS = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class MachineSpec:
    name: str
    disk: Path  # qcow2 overlay, writable, this VM's only
    workdir: Path  # vars file, console log, backend logs
    accel: Accel
    firmware: Firmware
    ssh_port: int
    ssh_key: Path
    memory_mib: int = 2048
    cpus: int = 2
    # More qcow2 disks, attached after the boot disk (the guest sees them as /dev/vdb, /dev/vdc, ...;
    # e.g. the blank target of an installer VM).
    extra_disks: tuple[Path, ...] = ()
    # The SMBIOS system serial the guest reports (/sys/class/dmi/id/product_serial): unique per VM
    # (default: the name and 8 random hex digits), so the harness can tell that SSH reached this
    # VM and not another one that got the same forwarded port.
    serial: str = ""

    def __post_init__(self) -> None:
        if not self.serial:
            object.__setattr__(self, "serial", f"{self.name}-{secrets.token_hex(4)}")
        if not SERIAL_CHARS.fullmatch(self.serial):
            raise ValueError(f"VM serial {self.serial!r}: use 1-64 of A-Z a-z 0-9 . _ -")

    @property
    def vars_file(self) -> Path:
        return self.workdir / "OVMF_VARS.fd"

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the kernel picks it, so workers never collide
    on a fixed range)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
