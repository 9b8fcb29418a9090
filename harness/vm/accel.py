"""Pick KVM or TCG. /dev/kvm existing is not enough (on some hosts it exists and guests hang in
the firmware): probe it by booting OVMF under KVM for a few seconds and looking for the firmware's
boot manager on the serial console. Every harness timeout is multiplied by `Accel.scale`.

Override with `--accel auto|kvm|tcg` or BOOTC_UNIFIED_ACCEL.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness.cache import file_lock, subdir
from harness.vm.firmware import Firmware, find_firmware

ENV = "BOOTC_UNIFIED_ACCEL"
CHOICES = ("auto", "kvm", "tcg")
PROBE_SECONDS = 20.0
KVM_DEVICE = "/dev/kvm"
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


def kvm_works(
    firmware: Firmware, seconds: float = PROBE_SECONDS, device: str = KVM_DEVICE
) -> tuple[bool, str]:
    """Boot OVMF under KVM (no disk) and wait for its boot manager; (works, why)."""
    if not os.access(device, os.R_OK | os.W_OK):
        return False, f"{device} is missing or not accessible"
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return False, "qemu-system-x86_64 not found"
    with tempfile.TemporaryDirectory(prefix="bootc-unified-kvm-probe-") as tmp:
        vars_file, serial, log = Path(tmp) / "vars.fd", Path(tmp) / "serial.log", Path(tmp) / "qemu.log"
        shutil.copyfile(firmware.vars_template, vars_file)
        argv = [
            qemu,
            *("-accel", "kvm", "-machine", "q35", "-m", "256", "-nodefaults", "-display", "none"),
            *("-no-user-config", "-no-reboot", "-serial", f"file:{serial}"),
            *("-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={firmware.code}"),
            *("-drive", f"if=pflash,format=raw,unit=1,file={vars_file}"),
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                if serial.exists() and PROBE_MARKER in serial.read_bytes():
                    return True, "OVMF reached its boot manager under KVM"
                errors = log.read_text(errors="replace")
                if "KVM internal error" in errors or "emulation failure" in errors:
                    return False, "KVM internal error while OVMF started (emulation failure)"
                if proc.poll() is not None:
                    return False, f"QEMU with KVM exited with {proc.returncode}: {errors.strip()[-200:]}"
                time.sleep(0.2)
            return False, f"OVMF did not reach its boot manager under KVM within {seconds:.0f}s"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _host_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_cached(firmware: Firmware) -> tuple[bool, str]:
    """kvm_works(), remembered for this host boot (one probe per boot, shared by all workers)."""
    path = subdir("accel") / f"kvm-{_host_boot_id()}.json"
    with file_lock("accel-probe"):
        if path.exists():
            data = json.loads(path.read_text())
            return bool(data["works"]), f"{data['why']} (probed earlier this host boot)"
        works, why = kvm_works(firmware)
        path.write_text(json.dumps({"works": works, "why": why}) + "\n")
        return works, why


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
    works, why = probe_cached(find_firmware())
    return Accel(KVM, 1.0, why) if works else Accel(TCG, TCG_SCALE, f"KVM unusable: {why}")
