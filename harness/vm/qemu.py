"""The plain-QEMU backend: qemu-system-x86_64 as a subprocess of the harness."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from harness.vm.machine import Machine, MachineError
from harness.vm.spec import MachineSpec

QEMU = "qemu-system-x86_64"


def missing_prerequisites() -> list[str]:
    return [] if shutil.which(QEMU) else [f"{QEMU} not found (Debian package qemu-system-x86)"]


def qemu_argv(spec: MachineSpec) -> list[str]:
    accel = "kvm" if spec.accel.name == "kvm" else "tcg,tb-size=256"
    cpu = ["-cpu", "host"] if spec.accel.name == "kvm" else []
    return [
        QEMU,
        *("-name", spec.name),
        *("-machine", "q35", "-accel", accel, *cpu),
        *("-m", str(spec.memory_mib), "-smp", str(spec.cpus)),
        *("-smbios", f"type=1,serial={spec.serial}"),  # the guest's product_serial (machine.py)
        *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
        *("-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={spec.firmware.code}"),
        *("-drive", f"if=pflash,format=raw,unit=1,file={spec.vars_file}"),
        *("-drive", f"if=none,id=disk0,format=qcow2,cache=unsafe,discard=unmap,file={spec.disk}"),
        *("-device", "virtio-blk-pci,drive=disk0,bootindex=1"),
        *(
            arg
            for n, extra in enumerate(spec.extra_disks, start=1)
            for arg in (
                *("-drive", f"if=none,id=disk{n},format=qcow2,cache=unsafe,discard=unmap,file={extra}"),
                *("-device", f"virtio-blk-pci,drive=disk{n}"),
            )
        ),
        *("-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22"),
        *("-device", "virtio-net-pci,netdev=net0"),
        *("-device", "virtio-rng-pci"),
        *("-chardev", f"file,id=serial0,path={spec.console_log},append=on"),
        *("-serial", "chardev:serial0"),
    ]


class QemuMachine(Machine):
    backend = "qemu"

    def __init__(self, spec: MachineSpec) -> None:
        super().__init__(spec)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = spec.workdir / "qemu.log"

    def _launch(self) -> None:
        argv = qemu_argv(self.spec)
        with open(self._log, "ab") as log:
            log.write(f"+ {shlex.join(argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _kill(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def wait_stopped(self, timeout: float) -> None:
        super().wait_stopped(timeout)
        if self._proc is not None and self._proc.returncode not in (0, None):
            tail = self._log.read_text(errors="replace").strip().splitlines()[-3:]
            raise MachineError(f"QEMU for {self.spec.name} exited with {self._proc.returncode}: {tail}")

    def describe(self) -> str:
        return shlex.join(qemu_argv(self.spec))

    def save_backend_artifacts(self, directory: Path) -> None:
        (directory / "qemu-cmdline.txt").write_text(self.describe() + "\n")
        if self._log.exists():
            (directory / "qemu.log").write_bytes(self._log.read_bytes())

    def kill_hint(self) -> str:
        pid = self._proc.pid if self._proc is not None else "?"
        return f"kill {pid}"
