"""Finalize a staged deployment: what `bootc-unified-finalize-staged.service` runs at shutdown
(bootc `BC/finalize.rs`, `BC/rollback.rs` `rename_exchange_bls_entries`).

  1. no staged marker, or a download-only one (`finalization_locked`): nothing to do;
  2. /etc 3-way merge (etcmerge.py): pristine = the booted image's /etc (its EROFS image mounted),
     current = the live /etc, new = state/deploy/<staged>/etc; then its `.updated` is deleted and
     the merge synced to disk (syncfs);
  3. `loader/entries.staged` and `loader/entries` swapped with renameat2(RENAME_EXCHANGE), the
     ESP synced (syncfs: the swap on disk before anything is deleted), the swapped-out set (the old
     entries) deleted, the ESP synced again;
  4. the marker removed.

A power cut before step 3 boots the old deployment (and the next shutdown merges again: applying
the merge twice gives the same tree); after it, the new one. vfat has RENAME_EXCHANGE since Linux
6.0 (the trixie guest runs 6.12).

On a booted system /sysroot is a read-only bind of the physical root; `writable_sysroot()` makes it
writable in a private mount namespace of this process only (as bootc does), so nothing else on
the system sees a writable /sysroot.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bootc_unified import faults, mountns
from bootc_unified.deploy import bls, etcmerge, sysrootlock
from bootc_unified.deploy.staged import MARKER, StagedMarker
from bootc_unified.deploy.sysroot import Esp, Sysroot, mounts
from bootc_unified.errors import UserError
from bootc_unified.libc import libc
from bootc_unified.repository import fsync_dir, sync_filesystem

AT_FDCWD = -100
RENAME_EXCHANGE = 2
SCRATCH = Path("/run/bootc-unified")


def rename_exchange(a: Path, b: Path) -> None:
    """Atomically swap two paths (both must exist) with renameat2(RENAME_EXCHANGE)."""
    rc = libc().renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        raise UserError(f"exchanging {a} and {b}: {os.strerror(err)}")


def swap_staged_entries(esp: Esp) -> None:
    """Make `loader/entries.staged` the live `loader/entries`; the old set is deleted."""
    if not esp.entries_staged.is_dir():
        raise UserError(f"{esp.entries_staged}: no staged boot entries")
    esp.entries.mkdir(parents=True, exist_ok=True)
    fsync_dir(esp.entries_staged)
    rename_exchange(esp.entries_staged, esp.entries)
    # The exchange reaches the disk before the old set is deleted. vfat's RENAME_EXCHANGE only
    # swaps the two inodes' slots in memory; each slot gets its new start cluster when that inode
    # is written back, which an fsync of loader/ does not do. A power cut during finalize left
    # on disk `entries` still naming the old set's cluster, already freed by the deletion, and
    # `entries.staged` gone: systemd-boot found no entry and offered only "Reboot Into Firmware
    # Interface" (power-cut scenario, finalize cuts on ext4 and XFS; the ESP read back with
    # fsck.fat: "/loader/entries contains a free cluster"). syncfs writes the inodes too.
    sync_filesystem(esp.root)
    faults.point("entries-after-exchange")
    shutil.rmtree(esp.entries_staged)
    sync_filesystem(esp.root)


def writable_sysroot(path: Path) -> None:
    """Make the read-only mount at `path` writable for this process (a private mount namespace:
    `/` made a slave, `path` remounted bind,rw). Nothing to do when it is writable already."""
    if not os.statvfs(path).f_flag & os.ST_RDONLY:
        return
    real = os.path.realpath(path)
    if not os.path.ismount(path) and real not in {m[0] for m in mounts(Path("/proc/self/mountinfo"))}:
        raise UserError(f"{path}: read-only, and not a mount point that could be remounted read-write")
    import subprocess

    if not mountns.entered():  # the command line has entered one already
        mountns.enter_private(str(path))
    proc = subprocess.run(["mount", "-o", "remount,bind,rw", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"{path}: cannot make it writable (mount -o remount,bind,rw: {last})")


@contextlib.contextmanager
def mounted_image(sysroot: Sysroot, depl_id: str) -> Iterator[Path]:
    """The EROFS image of deployment `depl_id` mounted read-only under /run/bootc-unified."""
    from bootc_unified.erofs.mount import mounted
    from bootc_unified.repository import Repository

    repo = Repository.open(sysroot.repo)
    image = repo.image_path(depl_id)
    if not image.exists():
        raise UserError(f"{image}: deployment {depl_id[:16]}… has no EROFS image in the repository")
    SCRATCH.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="image-", dir=SCRATCH))
    try:
        with mounted(image, repo.objects.dir, scratch, "off" if repo.insecure else "require") as mnt:
            yield mnt
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class FinalizeResult:
    depl_id: str
    merge: etcmerge.EtcDiff


def finalize(
    sysroot: Sysroot,
    esp: Esp,
    booted_id: str,
    current_etc: Path = Path("/etc"),
    marker: Path = MARKER,
) -> FinalizeResult | None:
    """Finalize the staged deployment; None when there is none or it is download-only. Under the
    sysroot lock. A run killed after its swap left the new entries live, the old set in
    `loader/entries.staged` and the marker: run again, it only removes those two (swapping again
    would put the old set back)."""
    with sysrootlock.locked(sysroot.root):
        return _finalize(sysroot, esp, booted_id, current_etc, marker)


def _names(directory: Path, depl_id: str) -> bool:
    """Does an entry in `directory` boot deployment `depl_id`?"""
    for ef in bls.read_entries(directory):
        with contextlib.suppress(UserError):  # status reports entries that do not parse
            if (arg := ef.entry.composefs) is not None and arg.digest == depl_id:
                return True
    return False


def _finalize(
    sysroot: Sysroot, esp: Esp, booted_id: str, current_etc: Path, marker: Path
) -> FinalizeResult | None:
    staged = StagedMarker.read(marker)
    if staged is None or staged.finalization_locked:
        return None
    if _names(esp.entries, staged.depl_id) and not _names(esp.entries_staged, staged.depl_id):
        shutil.rmtree(esp.entries_staged, ignore_errors=True)  # the swapped-out set
        fsync_dir(esp.entries.parent)
        marker.unlink(missing_ok=True)
        return FinalizeResult(staged.depl_id, etcmerge.EtcDiff())
    new_etc = sysroot.deployment(staged.depl_id) / "etc"
    if not new_etc.is_dir():
        raise UserError(f"{new_etc}: staged deployment {staged.depl_id[:16]}… has no /etc copy")
    with mounted_image(sysroot, booted_id) as booted:
        merge = etcmerge.apply(booted / "etc", current_etc, new_etc)
    faults.point("finalize-after-merge")
    (new_etc / ".updated").unlink(missing_ok=True)
    # The merged /etc is on disk before the entries name the deployment: once the swap is durable
    # a power cut boots the new deployment, which must not come up with the merge half-written
    # (the power-cut scenario's re-run upgrade found the live /etc/hosts entry missing).
    sync_filesystem(new_etc)
    swap_staged_entries(esp)
    faults.point("finalize-before-marker")
    marker.unlink(missing_ok=True)
    return FinalizeResult(staged.depl_id, merge)
