"""Loop-backed btrfs, XFS (reflink) and ext4 (verity feature) filesystems in sparse files.

`LoopFs.create(kind, workdir)` makes the image, attaches a loop device, formats and mounts it;
`close()` unmounts and detaches and is safe to call more than once. Use it as a context manager.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from harness.run import CommandError, run

KINDS = ("btrfs", "xfs", "ext4")
DEFAULT_SIZE = 1 << 30  # sparse: costs only what is written

MKFS: dict[str, list[str]] = {
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-F", "-O", "verity", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
}


def missing_prerequisites(kinds: tuple[str, ...] = KINDS) -> list[str]:
    """What stops loop filesystems from working here, one phrase each (empty: all good)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    if not Path("/dev/loop-control").exists():
        problems.append("no /dev/loop-control")
    for tool in ["losetup", "mount", "umount"] + [MKFS[k][0] for k in kinds]:
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found")
    return problems


@dataclass
class LoopFs:
    kind: str
    image: Path
    mountpoint: Path
    device: str = ""
    _mounted: bool = field(default=False, repr=False)

    @classmethod
    def create(cls, kind: str, workdir: Path, size: int = DEFAULT_SIZE, name: str | None = None) -> LoopFs:
        if kind not in MKFS:
            raise ValueError(f"unknown filesystem kind {kind!r}; choose from {', '.join(KINDS)}")
        name = name or kind
        workdir.mkdir(parents=True, exist_ok=True)
        image = workdir / f"{name}.img"
        mountpoint = workdir / name
        mountpoint.mkdir(exist_ok=True)
        with open(image, "wb") as f:
            f.truncate(size)
        fs = cls(kind, image, mountpoint)
        try:
            fs.device = run(["losetup", "--find", "--show", image]).stdout.strip()
            run([*MKFS[kind], fs.device])
            run(["mount", fs.device, mountpoint])
            fs._mounted = True
        except BaseException:
            fs.close()
            raise
        return fs

    @property
    def path(self) -> Path:
        return self.mountpoint

    def close(self) -> None:
        if self._mounted:
            # Lazy unmount as a last resort so a busy mount never leaks past the test run.
            try:
                run(["umount", self.mountpoint])
            except CommandError:
                run(["umount", "-l", self.mountpoint], check=False)
            self._mounted = False
        if self.device:
            run(["losetup", "-d", self.device], check=False)
            self.device = ""
        self.image.unlink(missing_ok=True)

    def __enter__(self) -> LoopFs:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def statvfs_used_bytes(self) -> int:
        st = os.statvfs(self.mountpoint)
        return (st.f_blocks - st.f_bfree) * st.f_frsize
