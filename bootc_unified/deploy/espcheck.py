"""Check and repair the ESP at boot, before anything mounts it (`internals fsck-esp`, run by
bootc-unified-esp-fsck.service).

FAT has no journal: a power cut while a verb writes `loader/entries.staged` can leave a directory
whose cluster was never written. The kernel then answers reads of it with EIO, logs "corrupted
directory (invalid entries)" and remounts the ESP read-only, so status, upgrade and GC fail until
someone runs fsck. A booted bootc system has its ESP in fstab, which makes systemd-fsck run
`fsck.fat -a` on it at boot; our verbs mount the ESP on demand (as bootc does), so this unit does
the same check: `fsck.fat -a -w` on the ESP of the physical root's disk, at every boot, before
anything mounts it (the boot goes on meanwhile; the verbs wait for it before they mount the ESP:
sysroot.wait_for_esp_check), pass after pass until it finds nothing more
(a directory whose cluster and FAT entry were never written takes three: its '.' entries, then
its start, then its orphaned long name). fsck.fat exits 0 when clean and 1 when it repaired
something, but also 1 when it gave up; a finished check prints its summary line.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bootc_unified.errors import UserError

from .sysroot import esp_partition

PASSES = 5  # fsck.fat -a may need more than one pass: a repair can expose the next problem


def fsck_esp(physical_root: Path = Path("/sysroot"), device: str | None = None) -> str:
    """Run `fsck.fat -a -w` on the ESP until it finds nothing to repair; one line saying what it
    repaired. UserError when it could not check or repair it."""
    device = device or esp_partition(physical_root)
    if device is None:
        raise UserError(f"no EFI system partition on the disk of {physical_root}")
    repaired: list[str] = []
    for _ in range(PASSES):
        try:
            proc = subprocess.run(["fsck.fat", "-a", "-w", device], capture_output=True, text=True)
        except FileNotFoundError as e:
            raise UserError("fsck.fat not found (dosfstools): cannot check the ESP") from e
        lines = [line.strip() for line in proc.stdout.splitlines() + proc.stderr.splitlines() if line.strip()]
        # a finished check ends with "DEVICE: N files, U/T clusters"; fsck.fat also exits 1 when it dies
        finished = any(line.startswith(f"{device}: ") and " clusters" in line for line in lines)
        if proc.returncode == 0 and finished:
            if not repaired:
                return f"ESP {device}: clean"
            return f"ESP {device}: repaired by fsck.fat -a: " + "; ".join(repaired)
        if proc.returncode != 1 or not finished:
            last = lines[-1] if lines else f"exit status {proc.returncode}"
            raise UserError(f"ESP {device}: fsck.fat -a failed (exit {proc.returncode}): {last}")
        noise = (f"{device}: ", "Auto-correcting", "Auto-deleting", "Creating", "fsck.fat ")
        repaired += [line for line in lines if not line.startswith(noise)] or ["dirty bit cleared"]
    last = "; ".join(repaired[-3:])
    raise UserError(f"ESP {device}: fsck.fat -a still repairs after {PASSES} passes: {last}")
