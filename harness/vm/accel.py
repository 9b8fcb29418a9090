"""Pick KVM or TCG. /dev/kvm existing is not enough (on some hosts it exists and guests hang in
the firmware): probe it by booting OVMF under KVM for a few seconds and looking for the firmware's
boot manager on the serial console. Every harness timeout is multiplied by `Accel.scale`.

Override with `--accel auto|kvm|tcg` or BOOTC_UNIFIED_ACCEL.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness.vm.firmware import Firmware, find_firmware

ENV = "BOOTC_UNIFIED_ACCEL"
CHOICES = ("auto", "kvm", "tcg")
PROBE_SECONDS = 20.0
PROBE_MARKER = b"BdsDxe"  # OVMF's boot device selection phase prints this on the serial console


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    scale: float  # timeout multiplier
    reason: str

    def timeout(self, seconds: float) -> float:
        return seconds * self.scale


KVM = "kvm"
TCG = "tcg"
TCG_SCALE = 10.0


def kvm_works(firmware: Firmware, seconds: float = PROBE_SECONDS) -> tuple[bool, str]:
    """Boot OVMF under KVM (no disk) and wait for its boot manager; (works, why)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return False, "qemu-system-x86_64 not found"
    with tempfile.TemporaryDirectory(prefix="bootc-unified-kvm-probe-") as tmp:
        vars_file, serial = Path(tmp) / "vars.fd", Path(tmp) / "serial.log"
        shutil.copyfile(firmware.vars_template, vars_file)
        argv = [
            qemu,
            *("-accel", "kvm", "-machine", "q35", "-m", "256", "-nodefaults", "-display", "none"),
            *("-no-user-config", "-no-reboot", "-serial", f"file:{serial}"),
            *("-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={firmware.code}"),
            *("-drive", f"if=pflash,format=raw,unit=1,file={vars_file}"),
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                if serial.exists() and PROBE_MARKER in serial.read_bytes():
                    return True, "OVMF reached its boot manager under KVM"
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    return False, f"QEMU with KVM exited with {proc.returncode}: {err.strip()[-200:]}"
                time.sleep(0.2)
            return False, f"OVMF did not reach its boot manager under KVM within {seconds:.0f}s"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()


@functools.cache
def detect(choice: str = "auto") -> Accel:
    """The accelerator to use: `choice` (or BOOTC_UNIFIED_ACCEL when choice is "auto")."""
    if choice == "auto":
        choice = os.environ.get(ENV, "auto") or "auto"
    if choice not in CHOICES:
        raise ValueError(f"accelerator {choice!r}: choose from {', '.join(CHOICES)}")
    if choice == TCG:
        return Accel(TCG, TCG_SCALE, "requested")
    if choice == KVM:
        return Accel(KVM, 1.0, "requested")
    works, why = kvm_works(find_firmware())
    return Accel(KVM, 1.0, why) if works else Accel(TCG, TCG_SCALE, f"KVM unusable: {why}")
