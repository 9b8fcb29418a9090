"""VMs: one interface (`Machine`), two backends (libvirt, plain QEMU), KVM/TCG detection."""

from __future__ import annotations

from harness.vm.accel import Accel, detect
from harness.vm.firmware import Firmware, find_firmware
from harness.vm.machine import Machine, MachineError, WrongMachine
from harness.vm.spec import MachineSpec, free_port

BACKENDS = ("libvirt", "qemu")


def create(backend: str, spec: MachineSpec) -> Machine:
    """A (not yet started) machine on `backend`."""
    if backend == "qemu":
        from harness.vm.qemu import QemuMachine

        return QemuMachine(spec)
    if backend == "libvirt":
        from harness.vm.libvirt_backend import LibvirtMachine

        return LibvirtMachine(spec)
    raise ValueError(f"unknown VM backend {backend!r}; choose from {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "Accel",
    "Firmware",
    "Machine",
    "MachineError",
    "MachineSpec",
    "WrongMachine",
    "create",
    "detect",
    "find_firmware",
    "free_port",
]
