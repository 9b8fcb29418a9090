"""`status.readOnly` (bootc's HostStatus.read_only): true only when the physical root is mounted
read-only from a read-only block device (a live ISO). Real loop devices: the kernel's own ro flag
(`losetup --read-only`, read back from sysfs by `blockdev --getro` as the oracle) and real mounts."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootc_unified.deploy.sysroot import Sysroot


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def ext4_image(tmp_path: Path) -> Path:
    image = tmp_path / "root.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    run("mkfs.ext4", "-q", str(image))
    return image


@pytest.fixture
def mount_loop(tmp_path: Path) -> Iterator[object]:
    attached: list[str] = []
    mounted: list[Path] = []

    def attach_and_mount(image: Path, device_ro: bool, mount_ro: bool) -> tuple[Path, str]:
        device = run("losetup", "--find", "--show", *(["--read-only"] if device_ro else []), str(image))
        attached.append(device)
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        run("mount", "-o", "ro" if mount_ro else "rw", device, str(point))
        mounted.append(point)
        return point, device

    yield attach_and_mount
    for point in reversed(mounted):
        subprocess.run(["umount", str(point)], capture_output=True)
    for device in attached:
        subprocess.run(["losetup", "-d", device], capture_output=True)


@pytest.mark.parametrize(
    ("device_ro", "mount_ro", "expected"),
    [(False, False, False), (False, True, False), (True, True, True)],
    ids=["rw-device-rw-mount", "rw-device-ro-mount", "ro-device (live ISO)"],
)
def test_read_only_medium(
    ext4_image: Path, mount_loop: object, device_ro: bool, mount_ro: bool, expected: bool
) -> None:
    point, device = mount_loop(ext4_image, device_ro, mount_ro)  # type: ignore[operator]
    assert run("blockdev", "--getro", device) == ("1" if device_ro else "0")  # the kernel's view
    assert Sysroot(point).on_read_only_medium() is expected
