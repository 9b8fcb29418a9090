"""`rollback`: make another deployment the default for the next boot (bootc `BC/rollback.rs`,
reference/deployments.md section 7), with any number of entries (bootc's needs exactly two).

- The booted entry is the default: the first non-booted entry in boot order becomes the default.
- A rollback is already queued (the default is not the booted entry): the booted one becomes the
  default again ("Reverting queued rollback state").
- The other entries keep their relative order. The set is rewritten into `loader/entries.staged`
  with one sort-key group, `bootc-bootc-<position>` (bootc's hard-coded os_id, so every entry of
  the set sorts in one group), and file-name priorities counting down to 0 (GRUB sorts names
  descending), then swapped with `loader/entries` by RENAME_EXCHANGE and the old set deleted.
  With two entries the keys are bootc's own (`-0`/`-1`).
- The new default must be able to boot (bootable.py: state dir, EROFS image, its objects): else
  one line naming what is missing, and nothing is changed. A garbled `.origin` does not stop it.
- A staged deployment is dropped first: `loader/entries.staged` removed and the marker deleted (its
  state dir stays until GC).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from bootc_unified import faults
from bootc_unified.deploy import bls, bootable
from bootc_unified.deploy.finalize import swap_staged_entries
from bootc_unified.deploy.staged import MARKER, StagedMarker
from bootc_unified.deploy.sysroot import Esp, Sysroot
from bootc_unified.errors import UserError
from bootc_unified.repository import Repository, fsync_dir

ROLLBACK_OS_ID = "bootc"  # bootc's rollback writes this os_id into every sort-key
TMP_PREFIX = ".entries.rollback."
_NAME = re.compile(r"^(bootc_.+)-\d+\.conf$")


@dataclass(frozen=True)
class RollbackResult:
    default: str  # deployment id that boots next
    reverted: bool  # a queued rollback was undone
    dropped_staged: str | None  # the staged deployment that was dropped
    order: tuple[str, ...]  # deployment ids in the new boot order


def _depl_id(ef: bls.EntryFile) -> str | None:
    try:
        arg = ef.entry.composefs
    except UserError:
        return None
    return arg.digest if arg else None


def _name_stem(ef: bls.EntryFile, os_id: str) -> str:
    """`bootc_<os_id>-<version>` of an entry file (its priority is rewritten)."""
    m = _NAME.match(ef.path.name)
    if m:
        return m.group(1)
    return bls.file_name(os_id, ef.entry.version or "0", 0).removesuffix("-0.conf")


def new_order(entries: list[bls.EntryFile], booted_id: str) -> tuple[list[bls.EntryFile], bool]:
    """The entries in their new boot order, and whether this reverts a queued rollback."""
    ids = [_depl_id(ef) for ef in entries]
    if booted_id not in ids:
        raise UserError(f"no boot entry for the booted deployment {booted_id[:16]}…")
    booted_at = ids.index(booted_id)
    if booted_at != 0:
        chosen, reverted = booted_at, True
    else:
        others = [i for i, d in enumerate(ids) if d is not None and d != booted_id]
        if not others:
            raise UserError("No rollback available")
        chosen, reverted = others[0], False
    return [entries[chosen], *(ef for i, ef in enumerate(entries) if i != chosen)], reverted


def check_bootable(sysroot: Sysroot, depl_id: str) -> None:
    """Refuse, in one line, a new default that cannot boot (bootable.py); a garbled `.origin`
    is no reason (the boot never reads it)."""
    try:
        repo: Repository | None = Repository.open(sysroot.repo)
    except UserError as e:
        raise UserError(f"rollback: deployment {depl_id[:16]}… cannot boot: {e}") from e
    found = bootable.problems(sysroot, repo, depl_id)
    if found:
        raise UserError(f"rollback: deployment {depl_id[:16]}… cannot boot: {found[0]}")


def rollback(
    esp: Esp, booted_id: str, marker: Path = MARKER, sysroot: Sysroot | None = None
) -> RollbackResult:
    """With `sysroot`, a new default that cannot boot is refused before anything is written."""
    entries = bls.read_entries(esp.entries)
    order, reverted = new_order(entries, booted_id)
    chosen = _depl_id(order[0])
    if sysroot is not None and not reverted and chosen is not None:
        check_bootable(sysroot, chosen)
    # drop a staged deployment
    staged = StagedMarker.read_or_none(marker)
    marker.unlink(missing_ok=True)
    if esp.entries_staged.exists():
        shutil.rmtree(esp.entries_staged)
    faults.point("rollback-after-drop-staged")
    # the re-keyed set, built beside loader/entries and swapped in (what a killed run left goes;
    # the caller holds the sysroot lock)
    for stale in esp.entries.parent.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    width = len(str(len(order) - 1))
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=esp.entries.parent))
    try:
        for pos, ef in enumerate(order):
            prio = len(order) - 1 - pos
            entry = replace(ef.entry, sort_key=f"bootc-{ROLLBACK_OS_ID}-{pos:0{width}d}")
            bls.write_entry(tmp, f"{_name_stem(ef, ROLLBACK_OS_ID)}-{prio}.conf", entry)
        with contextlib.suppress(PermissionError):  # vfat refuses modes it cannot store
            os.chmod(tmp, 0o755)
        fsync_dir(tmp)
        faults.point("rollback-before-rename")
        os.rename(tmp, esp.entries_staged)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    faults.point("rollback-before-swap")
    swap_staged_entries(esp)
    ids = tuple(d for d in (_depl_id(ef) for ef in order) if d is not None)
    return RollbackResult(
        default=ids[0],
        reverted=reverted,
        dropped_staged=staged.depl_id if staged else None,
        order=ids,
    )
