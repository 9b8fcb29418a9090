"""Mount a composefs image for inspection: EROFS (metadata) + overlayfs (data from objects/).

    mount -t erofs -o ro IMAGE LOWER              (a file straight away on kernels >= 6.12,
                                                   else through a loop device: -o ro,loop)
    mount -t overlay composefs -o ro,metacopy=on,redirect_dir=on,lowerdir=LOWER::OBJECTS[,verity=...] MNT

OBJECTS is a data-only lower layer ("::"): overlayfs looks files up there only through the
redirect xattrs the image carries. `mounted()` always unmounts both, also on errors.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bootc_unified.errors import UserError

VERITY_MODES = ("off", "on", "require")
LOWER_BASE = Path("/run/bootc-unified/composefs")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True)


def _mount(argv: list[str], what: str) -> None:
    proc = _run(argv)
    if proc.returncode != 0:
        raise UserError(f"{what}: {' '.join(argv)} failed: {proc.stderr.strip() or proc.returncode}")


def _umount(path: Path) -> None:
    if _run(["umount", str(path)]).returncode != 0:
        _run(["umount", "-l", str(path)])  # never leave a mount behind


def _check_option_path(path: Path) -> str:
    text = str(path)
    if any(c in text for c in ":,\\\n"):
        raise UserError(f"{path}: paths with ':', ',' or '\\' cannot be passed to overlayfs's lowerdir")
    return text


@contextmanager
def mount_erofs(image: Path, mountpoint: Path) -> Iterator[Path]:
    """The image's EROFS mounted read-only at `mountpoint` (file-backed, or via a loop device)."""
    proc = _run(["mount", "-t", "erofs", "-o", "ro", str(image), str(mountpoint)])
    if proc.returncode != 0:
        _mount(["mount", "-t", "erofs", "-o", "ro,loop", str(image), str(mountpoint)], f"{image}")
    try:
        yield mountpoint
    finally:
        _umount(mountpoint)


def mount(image: Path, objects: Path, mountpoint: Path, verity: str = "off") -> None:
    """Mount the composefs image at `mountpoint`, file data from `objects` (objects/XX/rest); it stays
    mounted (undo with `umount MOUNTPOINT`).

    The EROFS is mounted on a temporary lower directory under /run, the overlay on top of it, then
    the lower mount is detached: overlayfs holds its own private clone of each layer.
    `verity`: "off" (the host kernel has no fs-verity), "on" (check digests where files have
    verity), "require" (every file must have verity and match the image's digest).
    """
    if verity not in VERITY_MODES:
        raise ValueError(f"verity must be one of {', '.join(VERITY_MODES)}, not {verity!r}")
    image, objects, mountpoint = Path(image).absolute(), Path(objects).absolute(), Path(mountpoint).absolute()
    for p, what in ((image, "image"), (objects, "objects directory"), (mountpoint, "mount point")):
        if not p.exists():
            raise UserError(f"{p}: no such {what}")
    LOWER_BASE.mkdir(parents=True, exist_ok=True)
    lower = Path(tempfile.mkdtemp(prefix="lower-", dir=LOWER_BASE))
    try:
        with mount_erofs(image, lower):
            lowerdir = f"{_check_option_path(lower)}::{_check_option_path(objects)}"
            options = f"ro,metacopy=on,redirect_dir=on,lowerdir={lowerdir}"
            if verity != "off":
                options += f",verity={verity}"
            _mount(["mount", "-t", "overlay", "composefs", "-o", options, str(mountpoint)], f"{image}")
    finally:
        shutil.rmtree(lower, ignore_errors=True)


@contextmanager
def mounted(image: Path, objects: Path, mountpoint: Path, verity: str = "off") -> Iterator[Path]:
    """`mount()` for the duration of a with-block; always unmounted afterwards."""
    mount(image, objects, mountpoint, verity)
    try:
        yield Path(mountpoint)
    finally:
        _umount(Path(mountpoint))
