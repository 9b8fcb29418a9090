"""Soft reboot into a staged deployment (bootc `BC/soft_reboot.rs`, `BC/status.rs`;
reference/deployments.md section 13): `systemctl soft-reboot` restarts userspace into the tree
mounted at /run/nextroot, keeping the kernel.

- Capable iff the new deployment boots the same kernel and initramfs (the origins' `[boot]
  digest`) with the same command line apart from `composefs=` (every argument, in order).
- /run/nextroot is prepared by the initramfs' own script (boot/initramfs/scripts/local-bottom/
  bootc-unified, run with the new entry's options as its command line) on a bind of the physical
  root, so the soft-rebooted system is mounted exactly as a real boot mounts it: the EROFS image
  and objects as `/` (source `composefs:<id>`), the state dir's etc and var bound, the physical
  root read-only at /sysroot. It runs in PID 1's mount namespace (upgrade itself may be in a
  private one, see finalize.writable_sysroot), under a private tmpfs so the script can move mounts
  (a mount cannot be moved out of a shared parent such as /run), and the finished tree is moved
  onto /run/nextroot last.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import bootc_unified.boot
from bootc_unified import mountns
from bootc_unified.boot.cmdline import key_value, split_cmdline
from bootc_unified.errors import UserError

NEXTROOT = Path("/run/nextroot")
SOFT_REBOOT_TARGET = Path("/usr/lib/systemd/system/soft-reboot.target")
SCRATCH = Path("/run/bootc-unified")
SCRIPT = Path(bootc_unified.boot.__file__).parent / "initramfs/scripts/local-bottom/bootc-unified"


def incapable_reason(
    booted_digest: str | None, new_digest: str | None, booted_options: str, new_options: str
) -> str | None:
    """Why a soft reboot into the new deployment is not possible; None when it is."""
    if booted_digest is None or new_digest is None:
        return "the boot digest of the booted or the new deployment is not recorded"
    if booted_digest != new_digest:
        return "the kernel or initramfs differs from the booted one"

    def rest(options: str) -> list[str]:
        return [a for a in split_cmdline(options) if key_value(a)[0] != "composefs"]

    if rest(booted_options) != rest(new_options):
        return "the kernel command line differs from the booted one (besides composefs=)"
    return None


def _pid1_prefix() -> list[str]:
    """nsenter into the system's mount namespace (PID 1's, see mountns.outer_namespace) when this
    process is in a private one."""
    outer = mountns.outer_namespace()
    return [] if outer is None else ["nsenter", f"--mount={outer}", "--"]


def _run(prefix: Sequence[str], argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([*prefix, *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"preparing the soft reboot: {argv[0]} {argv[-1]}: {last}")
    return proc.stdout


def mount_source(point: Path) -> str | None:
    """The source of the topmost mount at `point` in the namespace the next root is mounted in
    (PID 1's, entered with nsenter when this process is in a private one, see
    finalize.writable_sysroot: its copy never sees mounts made under the private tmpfs), None
    when none is."""
    from bootc_unified.deploy.sysroot import MOUNTINFO, mounts, parse_mountinfo

    prefix = _pid1_prefix()
    table = parse_mountinfo(_run(prefix, ["cat", "/proc/self/mountinfo"])) if prefix else mounts(MOUNTINFO)
    found = None
    for mnt, _fstype, source in table:
        if mnt == str(point):
            found = source
    return found


def reset_nextroot(nextroot: Path = NEXTROOT) -> None:
    """Detach whatever is mounted on `nextroot` (bootc `prep-soft-reboot --reset`)."""
    prefix = _pid1_prefix()
    if mount_source(nextroot) is not None:
        _run(prefix, ["umount", "-R", "-l", str(nextroot)])


def prepare_nextroot(physical_root: Path, options: str, nextroot: Path = NEXTROOT) -> None:
    """Mount the deployment named by `composefs=` in `options` at `nextroot` as the initramfs would."""
    prefix = _pid1_prefix()
    reset_nextroot(nextroot)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="softreboot-", dir=SCRATCH))
    cmdline = work.with_name(f"{work.name}.cmdline")  # beside the tmpfs: visible in both namespaces
    try:
        _run(prefix, ["mount", "-t", "tmpfs", "-o", "mode=0700", "bootc-unified-softreboot", str(work)])
        try:
            _run(prefix, ["mount", "--make-private", str(work)])
            root = work / "root"
            _run(prefix, ["mkdir", str(root)])  # in PID 1's view of the tmpfs
            cmdline.write_text(options + "\n")
            _run(prefix, ["mount", "--bind", str(physical_root), str(root)])
            env = {
                "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                "rootmnt": str(root),
                "readonly": "y",  # a bind of the read-only /sysroot: the script remounts it rw
                "BOOTC_UNIFIED_CMDLINE": str(cmdline),
                "BOOTC_UNIFIED_BIN": "/usr/bin",
                "BOOTC_UNIFIED_WORK": str(work / "work"),
            }
            proc = subprocess.run([*prefix, "sh", str(SCRIPT)], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                with contextlib.suppress(UserError):
                    _run(prefix, ["umount", "-R", "-l", str(root)])
                raise UserError(f"preparing the soft reboot: {last}")
            if not (mount_source(root) or "").startswith("composefs:"):
                with contextlib.suppress(UserError):
                    _run(prefix, ["umount", "-R", "-l", str(root)])
                raise UserError(f"preparing the soft reboot: no composefs= in the new options {options!r}")
            nextroot.mkdir(parents=True, exist_ok=True)
            _run(prefix, ["mount", "--move", str(root), str(nextroot)])
        finally:
            with contextlib.suppress(UserError):
                _run(prefix, ["umount", "-l", str(work)])
    finally:
        cmdline.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.rmdir(work)


def soft_reboot() -> None:
    if not SOFT_REBOOT_TARGET.exists():
        raise UserError(f"cannot soft-reboot: {SOFT_REBOOT_TARGET} is missing (systemd 254 or later)")
    proc = subprocess.run(["systemctl", "soft-reboot"], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"systemctl soft-reboot: {last}")
