"""`switch IMAGE`: stage another image reference (bootc `BC/switch.rs`, reference/deployments.md
section 6; the shared steps are in update.py).

- The same reference as the current deployment's (staged, else booted): "Image specification is
  unchanged." and nothing else (with --apply and a staged deployment: reboot, as bootc).
- An image whose content is already deployed (the same EROFS id) is refused with one line: its
  state dir cannot be shared between two references (bootc's rule).
- Otherwise update.update() with the new reference; the new origin names it, so status'
  `spec.image` follows. `--experimental-unified-storage` takes the unified pull path even when
  the bootc store holds neither image. Never download-only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from bootc_unified.deploy import sysrootlock
from bootc_unified.deploy.spec import ImageReference
from bootc_unified.deploy.update import Say, SystemOpts, UpdateOpts, UpdateResult, booted, systemctl, update
from bootc_unified.errors import UserError
from bootc_unified.progress import Progress

TRANSPORTS = ("registry", "containers-storage", "oci")


@dataclass(frozen=True)
class SwitchOpts:  # bootc cli.rs SwitchOpts (the flags we take)
    target: str
    transport: str = "registry"
    apply: bool = False
    soft_reboot: str | None = None
    experimental_unified_storage: bool = False
    progress_fd: int | None = None
    quiet: bool = False
    system: SystemOpts = field(default_factory=SystemOpts)


def target_ref(opts: SwitchOpts) -> ImageReference:
    if opts.transport not in TRANSPORTS:
        raise UserError(f"--transport {opts.transport}: choose one of {', '.join(TRANSPORTS)}")
    image = opts.target.removeprefix("docker://") if opts.transport == "registry" else opts.target
    if not image.strip():
        raise UserError("switch: empty image reference")
    if opts.transport == "oci":
        directory, sep, tag = image.partition(":")
        image = os.path.abspath(directory) + sep + tag
    return ImageReference(image, opts.transport)


def run(opts: SwitchOpts, say: Say, progress: Progress | None = None) -> UpdateResult | None:
    """Under the sysroot lock (sysrootlock.py): what is booted and staged is read under it."""
    with sysrootlock.locked(opts.system.sysroot):
        return _run(opts, say, progress)


def _run(opts: SwitchOpts, say: Say, progress: Progress | None) -> UpdateResult | None:
    target = target_ref(opts)
    b = booted(opts.system)
    current = b.staged_or_booted
    if current is not None and target == current.imgref:
        say("Image specification is unchanged.")
        if opts.apply and b.staged is not None:
            systemctl(opts.system, "reboot")
        return None

    def identical(label: str) -> None:
        raise UserError(
            f"image {label} has the same content as a deployment already in the boot menu; "
            "switching to identical content under another reference is not supported"
        )

    update_opts = UpdateOpts(
        apply=opts.apply, soft_reboot=opts.soft_reboot, unified=opts.experimental_unified_storage
    )
    return update(opts.system, b, target, update_opts, identical, say, progress)
