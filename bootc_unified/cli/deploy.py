"""`bootc-unified install ...` and `bootc-unified status`: bootc's verbs and flags.

    install to-filesystem ROOT --boot-esp ESP [--karg K]... [--source-imgref REF] [--target-imgref REF]
        [--target-transport T] [--experimental-unified-storage] [--allow-missing-verity]
        [--tls-verify true|false] [--progress-fd N]
    install to-disk DEVICE [--filesystem ext4|xfs|btrfs] [--wipe] (same image flags)
    status [--format humanreadable|yaml|json] [--booted] [--sysroot DIR] [--esp DIR]
    rollback [--apply] [--esp DIR]
    upgrade [--check] [--apply] [--soft-reboot auto|required] [--download-only] [--from-downloaded]
        [--progress-fd N] [--quiet]
    switch [--transport registry|containers-storage|oci] [--apply] [--soft-reboot auto|required]
        [--progress-fd N] [--experimental-unified-storage] IMAGE
    internals finalize-staged [--sysroot DIR] [--esp DIR] [--etc DIR]   (hidden; the finalize unit's ExecStop)
    internals fsck-esp [--sysroot DIR] [--device DEV]   (hidden; bootc-unified-esp-fsck.service at boot)
    internals recover [--sysroot DIR]   (hidden; bootc-unified-recover.service at boot)

Each handler turns argv into a frozen options dataclass (`*_opts(args)`, tested in
tests/unit/test_cli.py) and calls the deploy module with it.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bootc_unified import progress
from bootc_unified.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Callable

    from bootc_unified.deploy.disk import InstallToDiskOpts
    from bootc_unified.deploy.install import InstallResult, InstallToFilesystemOpts
    from bootc_unified.deploy.switch import SwitchOpts
    from bootc_unified.deploy.update import SystemOpts
    from bootc_unified.deploy.upgrade import UpgradeOpts
    from bootc_unified.progress import Progress


def _image_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--karg", action="append", default=[], metavar="KARG", help="kernel argument (repeatable)")
    p.add_argument("--source-imgref", metavar="REF", help="docker://REF, containers-storage:IMG or oci:DIR")
    p.add_argument("--target-imgref", metavar="REF", help="the image reference later upgrades follow")
    p.add_argument("--target-transport", default="registry", metavar="T")
    p.add_argument(
        "--experimental-unified-storage",
        action="store_true",
        help="keep the image in ROOT/ostree/bootc/storage and import it zero-copy from there",
    )
    p.add_argument("--allow-missing-verity", action="store_true", help="install without fs-verity")
    p.add_argument("--tls-verify", choices=["true", "false"], default="true")
    p.add_argument("--progress-fd", type=int, metavar="N", help="write bootc progress JSON lines to fd N")


def register(sub: Any) -> None:
    install = sub.add_parser("install", help="install the first deployment")
    targets = install.add_subparsers(dest="target", required=True, metavar="TARGET")

    fs = targets.add_parser("to-filesystem", help="onto a mounted root filesystem and ESP")
    fs.add_argument("root", type=Path, metavar="ROOT")
    fs.add_argument("--boot-esp", type=Path, required=True, metavar="ESP", help="the mounted ESP")
    _image_flags(fs)
    fs.set_defaults(func=_to_filesystem)

    disk = targets.add_parser("to-disk", help="partition DEVICE (GPT: ESP + root), then to-filesystem")
    disk.add_argument("device", type=Path, metavar="DEVICE")
    disk.add_argument("--filesystem", default="ext4", metavar="FS", help="ext4 (default), xfs or btrfs")
    disk.add_argument(
        "--wipe", action="store_true", help="erase partition tables and signatures already on DEVICE"
    )
    _image_flags(disk)
    disk.set_defaults(func=_to_disk)

    status = sub.add_parser("status", help="the deployments: booted, staged, rollback")
    status.add_argument("--format", choices=["humanreadable", "yaml", "json"], default=None)
    status.add_argument("--booted", action="store_true", help="only the booted deployment")
    status.add_argument("--sysroot", type=Path, default=Path("/sysroot"), metavar="DIR")
    status.add_argument("--esp", type=Path, metavar="DIR", help="default: the mounted vfat ESP")
    status.add_argument("--mountinfo", type=Path, default=None, help=argparse.SUPPRESS)
    status.add_argument("--staged-marker", type=Path, default=None, help=argparse.SUPPRESS)
    status.set_defaults(func=_status)

    rollback = sub.add_parser("rollback", help="boot the previous deployment next (drops a staged one)")
    rollback.add_argument("--apply", action="store_true", help="reboot afterwards (systemctl reboot)")
    rollback.add_argument("--esp", type=Path, metavar="DIR", help="default: the mounted vfat ESP")
    rollback.add_argument("--sysroot", type=Path, default=Path("/sysroot"), help=argparse.SUPPRESS)
    rollback.add_argument("--mountinfo", type=Path, default=None, help=argparse.SUPPRESS)
    rollback.add_argument("--staged-marker", type=Path, default=None, help=argparse.SUPPRESS)
    rollback.set_defaults(func=_rollback)

    upgrade = sub.add_parser("upgrade", help="stage the newer image of the booted deployment's reference")
    upgrade.add_argument("--check", action="store_true", help="only say whether an update is available")
    upgrade.add_argument(
        "--download-only", action="store_true", help="stage, but do not finalize at shutdown"
    )
    upgrade.add_argument(
        "--from-downloaded", action="store_true", help="let a download-only staged deployment finalize"
    )
    _update_flags(upgrade)
    upgrade.add_argument("--quiet", action="store_true", help="no progress output")
    upgrade.set_defaults(func=_upgrade)

    switch = sub.add_parser("switch", help="stage another image reference")
    switch.add_argument("target", metavar="IMAGE")
    switch.add_argument("--transport", choices=["registry", "containers-storage", "oci"], default="registry")
    _update_flags(switch)
    switch.add_argument(
        "--experimental-unified-storage",
        action="store_true",
        help="pull into ostree/bootc/storage and import zero-copy from there",
    )
    switch.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    switch.set_defaults(func=_switch)


def _update_flags(p: argparse.ArgumentParser) -> None:
    """Flags upgrade and switch share: bootc's, then the hidden ones that point them at a loop
    sysroot in tests (as status/rollback/finalize-staged have)."""
    p.add_argument("--apply", action="store_true", help="reboot into the staged deployment")
    p.add_argument(
        "--soft-reboot",
        choices=["auto", "required"],
        default=None,
        help="soft-reboot when kernel, initramfs and kargs are unchanged (required: or fail)",
    )
    p.add_argument("--progress-fd", type=int, metavar="N", help="write bootc progress JSON lines to fd N")
    hidden = argparse.SUPPRESS
    p.add_argument("--sysroot", type=Path, default=Path("/sysroot"), help=hidden)
    p.add_argument("--esp", type=Path, default=None, help=hidden)
    p.add_argument("--mountinfo", type=Path, default=None, help=hidden)
    p.add_argument("--staged-marker", type=Path, default=None, help=hidden)
    p.add_argument("--etc", type=Path, default=Path("/etc"), help=hidden)
    p.add_argument("--system-store", type=Path, default=None, help=hidden)
    p.add_argument("--nextroot", type=Path, default=None, help=hidden)
    p.add_argument("--no-systemd", action="store_true", help=hidden)
    p.add_argument("--tls-verify", choices=["true", "false"], default="true", help=hidden)


def register_internals(groups: Any) -> None:
    """`internals finalize-staged` and `internals fsck-esp`: hidden (no help line), run by
    bootc-unified-finalize-staged.service and bootc-unified-esp-fsck.service."""
    fin = groups.add_parser("finalize-staged")
    fin.add_argument("--sysroot", type=Path, default=Path("/sysroot"), metavar="DIR")
    fin.add_argument("--esp", type=Path, metavar="DIR", help="default: the mounted vfat ESP")
    fin.add_argument("--etc", type=Path, default=Path("/etc"), metavar="DIR", help="the live /etc")
    fin.add_argument("--mountinfo", type=Path, default=None, help=argparse.SUPPRESS)
    fin.add_argument("--staged-marker", type=Path, default=None, help=argparse.SUPPRESS)
    fin.set_defaults(func=_finalize_staged)
    fsck = groups.add_parser("fsck-esp")
    fsck.add_argument("--sysroot", type=Path, default=Path("/sysroot"), metavar="DIR")
    fsck.add_argument("--device", default=None, metavar="DEV", help="default: the ESP of DIR's disk")
    fsck.set_defaults(func=_fsck_esp)
    rec = groups.add_parser("recover")
    rec.add_argument("--sysroot", type=Path, default=Path("/sysroot"), metavar="DIR")
    rec.set_defaults(func=_recover)


def _progress_fd(fd: int | None) -> int | None:
    if fd is None:
        return None
    if fd in (0, 1, 2):
        raise UserError(f"--progress-fd {fd}: use a descriptor other than stdin, stdout or stderr")
    try:
        os.fstat(fd)
    except OSError as e:
        raise UserError(f"--progress-fd {fd}: {e.strerror}") from e
    return fd


def to_filesystem_opts(args: argparse.Namespace) -> InstallToFilesystemOpts:
    from bootc_unified.deploy.install import InstallToFilesystemOpts

    return InstallToFilesystemOpts(
        root=args.root,
        boot_esp=args.boot_esp,
        karg=tuple(args.karg),
        source_imgref=args.source_imgref,
        target_imgref=args.target_imgref,
        target_transport=args.target_transport,
        experimental_unified_storage=args.experimental_unified_storage,
        allow_missing_verity=args.allow_missing_verity,
        tls_verify=args.tls_verify == "true",
        progress_fd=args.progress_fd,
    )


def to_disk_opts(args: argparse.Namespace) -> InstallToDiskOpts:
    from bootc_unified.deploy.disk import InstallToDiskOpts

    return InstallToDiskOpts(
        device=args.device,
        filesystem=args.filesystem,
        wipe=args.wipe,
        karg=tuple(args.karg),
        source_imgref=args.source_imgref,
        target_imgref=args.target_imgref,
        target_transport=args.target_transport,
        experimental_unified_storage=args.experimental_unified_storage,
        allow_missing_verity=args.allow_missing_verity,
        tls_verify=args.tls_verify == "true",
        progress_fd=args.progress_fd,
    )


@dataclass(frozen=True)
class StatusOpts:  # bootc cli.rs StatusOpts (+ --sysroot/--esp for a root that is not booted)
    format: str
    booted: bool = False
    sysroot: Path = Path("/sysroot")
    esp: Path | None = None
    mountinfo: Path | None = None
    staged_marker: Path | None = None


def status_opts(args: argparse.Namespace, tty: bool | None = None) -> StatusOpts:
    fmt = args.format
    if fmt is None:  # bootc: human-readable on a terminal, YAML otherwise
        fmt = "humanreadable" if (sys.stdout.isatty() if tty is None else tty) else "yaml"
    return StatusOpts(fmt, args.booted, args.sysroot, args.esp, args.mountinfo, args.staged_marker)


def _install(run: Callable[[Any, Progress], InstallResult], opts: Any) -> int:
    """Run an install verb with its progress sink (rich on a TTY, JSON lines on --progress-fd)."""
    sink = progress.for_cli(_progress_fd(opts.progress_fd))
    try:
        result = run(opts, sink)
    finally:
        sink.close()
    sys.stdout.write(result.summary())
    return 0


def _to_filesystem(args: argparse.Namespace) -> int:
    from bootc_unified.deploy.install import install_to_filesystem

    return _install(install_to_filesystem, to_filesystem_opts(args))


def _to_disk(args: argparse.Namespace) -> int:
    from bootc_unified.deploy.disk import install_to_disk

    return _install(install_to_disk, to_disk_opts(args))


def _status(args: argparse.Namespace) -> int:
    from bootc_unified.boot.cmdline import parse_composefs, read_proc_cmdline
    from bootc_unified.deploy import status, sysroot
    from bootc_unified.deploy.staged import MARKER, StagedMarker

    opts = status_opts(args)
    mountinfo = opts.mountinfo or sysroot.MOUNTINFO
    esp = opts.esp or sysroot.default_esp(mountinfo, opts.sysroot)
    booted = sysroot.booted_id(mountinfo)
    cmdline_arg = parse_composefs(read_proc_cmdline()) if opts.mountinfo is None else None
    try:
        marker, marker_problem = StagedMarker.read(opts.staged_marker or MARKER), None
    except UserError as e:  # status still answers, and says so
        marker, marker_problem = None, f"{e}; ignored (rollback drops it, an update replaces it)"
    report = status.build(
        sysroot.Sysroot(opts.sysroot),
        sysroot.Esp(esp),
        booted,
        marker,
        cmdline_arg.insecure if cmdline_arg else None,
    )
    if marker_problem:
        report.problems.insert(0, marker_problem)
    host = status.only_booted(report.host) if opts.booted else report.host
    report = status.StatusReport(host, report.problems)
    if opts.format != "humanreadable":
        for problem in report.problems:
            print(f"bootc-unified: warning: {problem}", file=sys.stderr)
    sys.stdout.write(status.render(report, opts.format))
    return 0


def _booted(mountinfo: Path | None, sysroot_path: Path, esp_arg: Path | None) -> tuple[str, Path]:
    """(booted deployment id, ESP) of the running system."""
    from bootc_unified.deploy import sysroot

    info = mountinfo or sysroot.MOUNTINFO
    booted = sysroot.booted_id(info)
    if booted is None:
        raise UserError("not booted from a composefs deployment (no composefs:<id> mount on /)")
    return booted, esp_arg or sysroot.default_esp(info, sysroot_path)


def _rollback(args: argparse.Namespace) -> int:
    import subprocess

    from bootc_unified.deploy.rollback import rollback
    from bootc_unified.deploy.staged import MARKER
    from bootc_unified.deploy.sysroot import Esp, Sysroot
    from bootc_unified.deploy.sysrootlock import locked

    booted, esp = _booted(args.mountinfo, args.sysroot, args.esp)
    with locked(args.sysroot):  # one deployment verb at a time (upgrade, finalize, GC wait)
        result = rollback(Esp(esp), booted, args.staged_marker or MARKER, Sysroot(args.sysroot))
    if result.dropped_staged:
        print(f"Dropped staged deployment {result.dropped_staged}")
    if result.reverted:
        print("Reverting queued rollback state")
    print(f"Next boot: deployment {result.default}")
    if args.apply:
        proc = subprocess.run(["systemctl", "reboot"], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            raise UserError(f"systemctl reboot: {last}")
    return 0


def system_opts(args: argparse.Namespace) -> SystemOpts:
    from bootc_unified.deploy.update import SystemOpts

    defaults = SystemOpts()
    return SystemOpts(
        sysroot=args.sysroot,
        esp=args.esp,
        mountinfo=args.mountinfo or defaults.mountinfo,
        staged_marker=args.staged_marker or defaults.staged_marker,
        etc=args.etc,
        system_store=args.system_store or defaults.system_store,
        nextroot=args.nextroot or defaults.nextroot,
        systemd=not args.no_systemd,
        tls_verify=args.tls_verify == "true",
    )


def upgrade_opts(args: argparse.Namespace) -> UpgradeOpts:
    from bootc_unified.deploy.upgrade import UpgradeOpts

    exclusive = [f for f in ("check", "download_only", "from_downloaded") if getattr(args, f)]
    if len(exclusive) > 1:
        flags = " and ".join("--" + f.replace("_", "-") for f in exclusive)
        raise UserError(f"upgrade: {flags} cannot be combined")
    if args.check and (args.apply or args.soft_reboot):
        raise UserError("upgrade: --check cannot be combined with --apply or --soft-reboot")
    if args.download_only and (args.apply or args.soft_reboot):
        raise UserError("upgrade: --download-only cannot be combined with --apply or --soft-reboot")
    return UpgradeOpts(
        check=args.check,
        apply=args.apply,
        soft_reboot=args.soft_reboot,
        download_only=args.download_only,
        from_downloaded=args.from_downloaded,
        progress_fd=args.progress_fd,
        quiet=args.quiet,
        system=system_opts(args),
    )


def switch_opts(args: argparse.Namespace) -> SwitchOpts:
    from bootc_unified.deploy.switch import SwitchOpts

    return SwitchOpts(
        target=args.target,
        transport=args.transport,
        apply=args.apply,
        soft_reboot=args.soft_reboot,
        experimental_unified_storage=args.experimental_unified_storage,
        progress_fd=args.progress_fd,
        quiet=args.quiet,
        system=system_opts(args),
    )


def _say(line: str) -> None:
    print(line, flush=True)


def _with_progress(run: Callable[[Any, Any, Progress], object], opts: Any) -> int:
    sink = progress.NullProgress() if opts.quiet else progress.for_cli(_progress_fd(opts.progress_fd))
    try:
        run(opts, _say, sink)
    finally:
        sink.close()
    return 0


def _upgrade(args: argparse.Namespace) -> int:
    from bootc_unified.deploy import upgrade

    return _with_progress(upgrade.run, upgrade_opts(args))


def _switch(args: argparse.Namespace) -> int:
    from bootc_unified.deploy import switch

    return _with_progress(switch.run, switch_opts(args))


def _fsck_esp(args: argparse.Namespace) -> int:
    from bootc_unified.deploy.espcheck import fsck_esp

    print(fsck_esp(args.sysroot, args.device))
    return 0


def _recover(args: argparse.Namespace) -> int:
    from bootc_unified.deploy.finalize import writable_sysroot
    from bootc_unified.deploy.sysroot import Sysroot
    from bootc_unified.repository import Repository, interrupted

    sysroot = Sysroot(args.sysroot)
    if not interrupted(sysroot.repo):  # a clean boot: no rw remount, nothing read
        print(f"{sysroot.repo}: nothing to recover")
        return 0
    writable_sysroot(args.sysroot)
    report = Repository.open(sysroot.repo).recover()
    print(report.line(sysroot.repo) if report else f"{sysroot.repo}: nothing to recover")
    return 0


def _finalize_staged(args: argparse.Namespace) -> int:
    from bootc_unified.deploy.finalize import finalize, writable_sysroot
    from bootc_unified.deploy.staged import MARKER, StagedMarker
    from bootc_unified.deploy.sysroot import Esp, Sysroot

    marker = args.staged_marker or MARKER
    staged = StagedMarker.read(marker)
    if staged is None:
        print("No staged deployment")
        return 0
    if staged.finalization_locked:
        print(f"Staged deployment {staged.depl_id} is download-only; not finalizing")
        return 0
    booted, esp = _booted(args.mountinfo, args.sysroot, args.esp)
    writable_sysroot(args.sysroot)
    result = finalize(Sysroot(args.sysroot), Esp(esp), booted, args.etc, marker)
    if result is None:  # another finalize got the sysroot lock first and did it
        print("No staged deployment")
        return 0
    m = result.merge
    print(
        f"Finalized deployment {result.depl_id}: /etc merge kept {len(m.added)} added, "
        f"{len(m.modified)} modified, {len(m.removed)} removed"
    )
    # The swapped-out entries named the old rollback: its state and kernel dirs go now; the
    # stores wait for the next upgrade/switch GC (no podman at shutdown). A failure here is only
    # reported: the new deployment is already the default.
    from bootc_unified.deploy.gc import GcOpts, gc
    from bootc_unified.deploy.sysroot import MOUNTINFO

    opts = GcOpts(
        args.sysroot, esp, mountinfo=args.mountinfo or MOUNTINFO, staged_marker=marker, boot_only=True
    )
    try:
        report = gc(opts)
    except UserError as e:
        print(f"GC after finalize skipped: {e}", file=sys.stderr)
        return 0
    print(
        f"GC: removed {len(report.removed_deployments)} deployments, "
        f"{len(report.removed_kernel_dirs)} kernel dirs"
    )
    return 0
