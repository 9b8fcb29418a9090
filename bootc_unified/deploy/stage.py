"""Stage a new deployment next to the booted one (bootc `BC/update.rs` `do_upgrade` steps 4-7,
reference/deployments.md sections 3 and 6). The new image is already imported into the repository
(its EROFS image id is the new deployment id); upgrade and switch call this after pulling.

In order:
  1. refuse: the new id is already a deployment in `loader/entries`; the booted id has no entry;
  2. mount the booted and the new EROFS images; /etc merge dry-run (pristine = booted image's /etc,
     current = the live /etc, new = the new image's /etc): an unmergeable path is a one-line error
     and nothing has been written;
  3. drop a previous staging (marker, `loader/entries.staged`, a stale `state/deploy/<new id>`);
  4. kernel dir (shared with an existing one when the bytes are equal, bls.install_kernel);
  5. state dir: etc copy of the new image, var link, .origin (state.write_deployment);
  6. `loader/entries.staged/`: the new primary entry, options = the booted entry's with only
     `composefs=` replaced (keeping its `?`), then the kargs.d diff between the booted and the new
     image (removed kargs dropped by exact match, added ones appended); plus a copy of the booted
     entry re-keyed as secondary (`-0.conf`, sort-key `bootc-<new os_id>-1`). Built in a
     temporary dir, fsynced, renamed into place;
  7. last, the staged marker (`finalization_locked` = download-only).
The booted deployment stays the default until finalize swaps the entry directories. On failure
everything this call created is removed again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from bootc_unified import faults
from bootc_unified.boot.cmdline import (
    ComposefsArg,
    join_cmdline,
    parse_composefs,
    replace_composefs,
    split_cmdline,
)
from bootc_unified.deploy import bls, etcmerge, kargs, state
from bootc_unified.deploy.finalize import mounted_image
from bootc_unified.deploy.install import Undo, find_kernel
from bootc_unified.deploy.origin import BootSection, Origin
from bootc_unified.deploy.osrelease import OsRelease
from bootc_unified.deploy.staged import MARKER, StagedMarker
from bootc_unified.deploy.sysroot import Esp, Sysroot
from bootc_unified.errors import UserError
from bootc_unified.repository import fsync_dir


@dataclass(frozen=True)
class StageResult:
    depl_id: str
    entry: Path  # the new primary entry in loader/entries.staged
    secondary: Path  # the booted entry's re-keyed copy
    options: str
    kernel_dir: Path
    kernel_shared: bool
    merge: etcmerge.EtcDiff  # the dry run: what finalize will carry over


def booted_entry(esp: Esp, booted_id: str) -> bls.EntryFile:
    for ef in bls.read_entries(esp.entries):
        with contextlib.suppress(UserError):  # status reports entries that do not parse
            arg = ef.entry.composefs
            if arg is not None and arg.digest == booted_id:
                return ef
    raise UserError(f"{esp.entries}: no boot entry for the booted deployment {booted_id[:16]}…")


def deployed_ids(esp: Esp) -> set[str]:
    out = set()
    for ef in bls.read_entries(esp.entries):
        with contextlib.suppress(UserError):  # status reports entries that do not parse
            arg = ef.entry.composefs
            if arg is not None:
                out.add(arg.digest)
    return out


def upgrade_options(booted_options: str, new_id: str, old_kargs: list[str], new_kargs: list[str]) -> str:
    """The booted entry's options with only `composefs=` replaced, then the kargs.d diff."""
    booted = split_cmdline(booted_options)
    arg = parse_composefs(booted, "booted entry options")
    args = replace_composefs(booted, ComposefsArg(new_id, bool(arg and arg.insecure)))
    removed = [k for k in old_kargs if k not in new_kargs]
    added = [k for k in new_kargs if k not in old_kargs]
    args = [a for a in args if a not in removed]
    args += [k for k in added if k not in args]
    return join_cmdline(args)


def stage(
    sysroot: Sysroot,
    esp: Esp,
    booted_id: str,
    new_id: str,
    origin: Origin,
    *,
    current_etc: Path = Path("/etc"),
    download_only: bool = False,
    marker: Path = MARKER,
) -> StageResult:
    if new_id == booted_id or new_id in deployed_ids(esp):
        raise UserError(f"deployment {new_id[:16]}… is already in the boot menu")
    booted = booted_entry(esp, booted_id)
    booted_arg = booted.entry.composefs
    assert booted_arg is not None
    undo = Undo()
    try:
        with mounted_image(sysroot, booted_id) as old_root, mounted_image(sysroot, new_id) as new_root:
            merge = etcmerge.check_mergeable(old_root / "etc", current_etc, new_root / "etc")
            label = f"for deployment {new_id[:16]}…"
            _kver, vmlinuz, initramfs = find_kernel(new_root, label)
            try:
                old_kargs, new_kargs = kargs.from_root(old_root), kargs.from_root(new_root)
            except UserError as e:
                text = str(e).replace(str(old_root), "booted image ").replace(str(new_root), "new image ")
                raise UserError(text) from e
            old_os, new_os = OsRelease.from_root(old_root), OsRelease.from_root(new_root)

            # 3. a previous staging goes
            marker.unlink(missing_ok=True)
            if esp.entries_staged.exists():
                shutil.rmtree(esp.entries_staged)
            if sysroot.deployment(new_id).exists():
                shutil.rmtree(sysroot.deployment(new_id))
            faults.point("stage-after-drop")

            # 4. and 5.
            kdir = bls.install_kernel(esp, new_id, vmlinuz, initramfs)
            if kdir.created:
                undo.path(kdir.path)
            faults.point("stage-after-kernel")
            origin = replace(origin, boot=BootSection("bls", kdir.digest))
            undo.path(sysroot.deployment(new_id))
            state.write_deployment(sysroot, new_id, new_root, origin)
            faults.point("stage-after-state")

        # 6. the staged entries, once the repository, the state dir and the kernel dir are durable:
        # a power cut must not leave a boot entry naming what did not reach the disk
        os.sync()
        version = new_os.version(new_id)
        primary = bls.BlsEntry(
            title=new_os.title(new_id),
            version=version,
            linux=kdir.linux,
            initrd=(kdir.initrd,),
            options=upgrade_options(booted.entry.options or "", new_id, old_kargs, new_kargs),
            sort_key=bls.sort_key(new_os.os_id, primary=True),
        )
        primary_name = bls.file_name(new_os.os_id, version, bls.PRIMARY)
        # Both keys in the new image's group (**better** than bootc, which keeps the booted os_id
        # here): systemd-boot sorts sort-keys ascending, so after a switch to an OS whose ID sorts
        # after the old one ("bootc-os-1" < "bootc-os-alt-0") the old entry would stay the default.
        secondary = replace(booted.entry, sort_key=bls.sort_key(new_os.os_id, primary=False))
        secondary_name = bls.file_name(old_os.os_id, booted.entry.version or booted_id, bls.SECONDARY)
        esp.entries_staged.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".entries.staged.", dir=esp.entries_staged.parent))
        undo.path(tmp)
        bls.write_entry(tmp, primary_name, primary)
        bls.write_entry(tmp, secondary_name, secondary)
        fsync_dir(tmp)
        with contextlib.suppress(PermissionError):  # mkdtemp makes 0700; vfat refuses modes
            os.chmod(tmp, 0o755)
        faults.point("stage-before-entries-rename")
        undo.path(esp.entries_staged)
        os.rename(tmp, esp.entries_staged)
        fsync_dir(esp.entries_staged.parent)
        faults.point("stage-before-marker")

        # 7. the marker, last
        StagedMarker(new_id, download_only).write(marker)
    except BaseException:
        undo.run()
        raise
    undo.commit()
    return StageResult(
        depl_id=new_id,
        entry=esp.entries_staged / primary_name,
        secondary=esp.entries_staged / secondary_name,
        options=primary.options or "",
        kernel_dir=kdir.path,
        kernel_shared=kdir.shared,
        merge=merge,
    )
