"""`upgrade`: stage the newer image of the booted (or staged) deployment's reference (bootc
`BC/update.rs`, reference/deployments.md section 6; the shared steps are in update.py).

- `--check`: read the remote manifest only and compare its digest with the current deployment's
  (the staged one when one is staged, else the booted one): "No changes in: <image>" or
  "Update available for: <image>" and the new digest. Nothing is written.
- `--from-downloaded`: a download-only staged deployment becomes finalizable (its marker's
  `finalization_locked` flipped to false, the finalize unit started); no pull. Without such a
  staged deployment: a one-line error.
- otherwise: update.update() with the current reference; a new image id equal to a deployment in
  the boot menu prints "No changes in <image>" and stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bootc_unified.deploy import remote, sysrootlock
from bootc_unified.deploy.staged import StagedMarker
from bootc_unified.deploy.update import (
    FINALIZE_UNIT,
    Say,
    SystemOpts,
    UpdateOpts,
    UpdateResult,
    booted,
    systemctl,
    update,
)
from bootc_unified.errors import UserError
from bootc_unified.progress import Progress


@dataclass(frozen=True)
class UpgradeOpts:  # bootc cli.rs UpgradeOpts (the flags we take)
    check: bool = False
    apply: bool = False
    soft_reboot: str | None = None
    download_only: bool = False
    from_downloaded: bool = False
    progress_fd: int | None = None
    quiet: bool = False
    system: SystemOpts = field(default_factory=SystemOpts)


def check(opts: UpgradeOpts, say: Say) -> bool:
    """`--check`: True when an update is available."""
    b = booted(opts.system)
    target = b.current.imgref
    if target.transport != "registry":
        raise UserError(f"upgrade --check: {target} is not a registry image")
    image = remote.inspect(target.image, opts.system.tls_verify)
    if b.current.image.manifest_digest in image.digests:
        say(f"No changes in: {target}")
        return False
    say(f"Update available for: {target}")
    say(f"  Digest: {image.digest}")
    return True


def from_downloaded(opts: UpgradeOpts, say: Say) -> str:
    """`--from-downloaded`: unlock the download-only staged deployment; returns its id."""
    with sysrootlock.locked(opts.system.sysroot):
        return _from_downloaded(opts, say)


def _from_downloaded(opts: UpgradeOpts, say: Say) -> str:
    marker = StagedMarker.read(opts.system.staged_marker)
    if marker is None or not marker.finalization_locked:
        raise UserError(
            "upgrade --from-downloaded: no download-only staged deployment "
            "(stage one with upgrade --download-only)"
        )
    systemctl(opts.system, "start", FINALIZE_UNIT)
    StagedMarker(marker.depl_id, finalization_locked=False).write(opts.system.staged_marker)
    say(f"Unlocked staged deployment {marker.depl_id}: it is finalized at shutdown")
    if opts.apply:
        systemctl(opts.system, "reboot")
    return marker.depl_id


def run(opts: UpgradeOpts, say: Say, progress: Progress | None = None) -> UpdateResult | None:
    if opts.check:
        check(opts, say)
        return None
    with sysrootlock.locked(opts.system.sysroot):  # what is booted and staged is read under it
        if opts.from_downloaded:
            from_downloaded(opts, say)
            return None
        b = booted(opts.system)
        target = b.current.imgref
        update_opts = UpdateOpts(
            apply=opts.apply, soft_reboot=opts.soft_reboot, download_only=opts.download_only
        )
        return update(
            opts.system, b, target, update_opts, lambda label: say(f"No changes in {label}"), say, progress
        )
