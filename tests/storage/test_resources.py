"""Running out of space (issue 12, R3), with the kernel's own ENOSPC on real filesystems:

- during the import of an upgrade: the bootc store full (the loop sysroot filled with fallocate,
  podman's pull hits it) or the repository full (composefs/ on a tmpfs with `size=`, from another
  filesystem than the store, so the import copies and our object writer hits it). The new image's
  layer is a 128 MiB file that gzip shrinks to a few hundred KiB, so the disk-space preflight
  (compressed layer sizes vs free space, bootc's rule) lets it through. The upgrade fails in one
  line naming the path at fault; nothing is published (no new ref, no state dir, no entry, no
  staged marker, fsck clean, podman does not list the image); once space is freed the same
  upgrade stages it;
- a full ESP while staging (a tmpfs with `size=` as the ESP: the host cannot mount vfat): a switch
  to an image with another kernel fails writing its kernel dir, in one line; the ESP is byte for
  byte as before, so the booted deployment still boots from the same entry and kernel; with room
  on the ESP the switch stages.

The preflight refusing an image too big for the disk is test_upgrade.py
`test_disk_space_refusal_stages_nothing` (not repeated here).

Oracles: statvfs and the kernel's ENOSPC, plain listings and bytes of the sysroot and the ESP,
`ls-refs` and `fsck` of the repository (the CLI), podman's own view of the bootc store, sha256 of
the kernel files against the bytes built into the image.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.pytest_plugin import require
from harness.registry import Registry
from harness.run import run
from harness.testimages import Buildah, push
from harness.testimages import missing_prerequisites as images_missing
from testsupport import bootimages
from testsupport.bootimages import (
    BOOT_DIGEST,
    KERNEL_FILES,
    KVER,
    BootImage,
    Target,
    base_files,
    blob,
    booted_mountinfo,
    build,
    deployment_id,
    install,
    listing,
    podman_on,
)
from testsupport.plugin import run_cli

pytestmark = pytest.mark.storage

target = bootimages.target  # the fixture: a loop filesystem with root/ and esp/ directories

# more than ext4's root-reserved blocks (5% of the 1 GiB loop fs) plus what is left free; gzip: ~130 KiB
BIG_TEXT = b"bootc-unified fills the disk\n" * ((128 << 20) // 29)
OTHER_KERNEL = {
    f"usr/lib/modules/{KVER}/vmlinuz": blob("vmlinuz-res", 300_000),
    f"usr/lib/modules/{KVER}/initramfs.img": blob("initramfs-res", 100_000),
}


@pytest.fixture(scope="session")
def res_images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, BootImage]:
    """v1; big (v1's files as 2.0 plus a 128 MiB file of one repeated line); alt (another kernel)."""
    require(images_missing(), "building bootable test images")
    b = Buildah(tmp_path_factory.mktemp("resimages"))
    big_text = {"usr/share/big-text": BIG_TEXT}
    images = {
        "v1": ("1.0", {**base_files("1.0"), **KERNEL_FILES}),
        "big": ("2.0", {**base_files("2.0"), **KERNEL_FILES, **big_text}),
        "alt": ("9.0", {**base_files("9.0"), **OTHER_KERNEL}),
    }
    out = {}
    try:
        for name, (version, files) in images.items():
            build(b, f"res-{name}", version, files, dirs=("sysroot",))
            ref, digest = push(b, f"res-{name}", registry.address, "gzip")
            out[name] = BootImage(f"res-{name}", ref, digest, version)
    finally:
        b.close()
    return out


# --- helpers --------------------------------------------------------------------------------------


def verb(name: str, t: Target, booted: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`upgrade`/`switch` as booted from `booted`, on the loop sysroot, without systemd."""
    return run_cli(
        name,
        *("--sysroot", t.root, "--esp", t.esp, "--mountinfo", booted_mountinfo(booted, tmp)),
        *("--staged-marker", tmp / "staged-deployment", "--etc", t.root / "state/deploy" / booted / "etc"),
        *("--system-store", tmp / "no-system-store", "--no-systemd", "--tls-verify", "false", "--quiet"),
        *args,
        check=False,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == 1, (proc.stdout, err)
    assert "\n" not in err and all(n in err for n in needles), err


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_bsize


def fill(fs: Path, keep: int) -> None:
    """fallocate files on `fs` until about `keep` bytes stay free (btrfs gives back less than
    statvfs promised: in steps)."""
    for n in range(8):
        size = free_bytes(fs) - keep
        if size <= 0:
            break
        part = fs / f"filler{n}"
        proc = subprocess.run(["fallocate", "-l", str(size), part], capture_output=True, text=True)
        if proc.returncode != 0:
            subprocess.run(["fallocate", "-l", str(size // 2), part], capture_output=True)
        run(["sync", "-f", fs])


def published(t: Target, tmp: Path) -> dict[str, object]:
    """What a refused update must leave as it was: refs, state dirs, the ESP (bytes), the marker,
    temporaries of the update (ostree/bootc/.update-storage-*)."""
    return {
        "refs": run_cli("internals", "cfs", "--repo", t.root / "composefs", "ls-refs").stdout,
        "state": sorted(os.listdir(t.root / "state/deploy")),
        "esp": {p: sha256(t.esp / p) for p in listing(t.esp) if (t.esp / p).is_file()},
        "esp-dirs": listing(t.esp),
        "marker": (tmp / "staged-deployment").exists(),
        "bootc": sorted(os.listdir(t.root / "ostree/bootc")),
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fsck_clean(t: Target) -> None:
    proc = run_cli("internals", "cfs", "--repo", t.root / "composefs", "fsck", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def store_digests(t: Target, tmp: Path) -> set[str]:
    if not (t.store / "overlay-images").is_dir():
        return set()
    pm = podman_on(t.store, tmp / "podman-view")
    try:
        return {str(i["Digest"]) for i in pm.images()}
    finally:
        pm.close()


def staged_id(tmp: Path) -> str:
    return str(json.loads((tmp / "staged-deployment").read_text())["depl_id"])


@pytest.fixture
def tmpfs_mounts() -> Iterator[list[Path]]:
    """tmpfs mount points to unmount at teardown (before the loop filesystem under them)."""
    points: list[Path] = []
    yield points
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def mount_tmpfs(at: Path, size: int, mounts: list[Path]) -> None:
    run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", at])
    mounts.append(at)


def resize_tmpfs(at: Path, size: int) -> None:
    run(["mount", "-o", f"remount,size={size}", at])


def tmpfs_used(at: Path) -> int:
    st = os.statvfs(at)
    return (st.f_blocks - st.f_bfree) * st.f_bsize


# --- ENOSPC during the import -----------------------------------------------------------------------


@pytest.mark.parametrize("full", ["store", "repository"])
def test_enospc_during_import(
    target: Target,
    res_images: dict[str, BootImage],
    tmp_path: Path,
    tmpfs_mounts: list[Path],
    full: str,
    registry: Registry,
) -> None:
    t, imgs = target, res_images
    ref = f"{registry.address}/res/{t.fs.kind}-{full}/os:latest"
    run(["skopeo", "copy", "--quiet", "--preserve-digests", "--src-tls-verify=false",
         "--dest-tls-verify=false", imgs["v1"].docker, f"docker://{ref}"])  # fmt: skip
    unified = ("--experimental-unified-storage",) if full == "store" else ()
    install(t, "--allow-missing-verity", *unified, "--source-imgref", f"docker://{ref}")
    a = deployment_id(t)
    run(["skopeo", "copy", "--quiet", "--preserve-digests", "--src-tls-verify=false",
         "--dest-tls-verify=false", imgs["big"].docker, f"docker://{ref}"])  # fmt: skip

    if full == "store":  # the loop sysroot itself: podman's pull into the bootc store hits ENOSPC
        fill(t.fs.path, keep=8 << 20)
        where = t.fs.path
    else:  # composefs/ on its own small tmpfs: the import copies across filesystems
        repo = t.root / "composefs"
        os.rename(repo, t.root / "composefs.orig")
        repo.mkdir(mode=0o700)
        mount_tmpfs(repo, 64 << 20, tmpfs_mounts)
        run(["cp", "-a", f"{t.root / 'composefs.orig'}/.", repo])
        run(["rm", "-rf", t.root / "composefs.orig"])
        resize_tmpfs(repo, tmpfs_used(repo) + (8 << 20))
        where = repo
    free = free_bytes(where)
    assert 2 << 20 < free < 12 << 20, free  # more than the compressed layers, less than the file
    before = published(t, tmp_path)

    proc = verb("upgrade", t, a, tmp_path)
    if full == "store":  # podman's words, after the store's path
        one_line_error(proc, f"{t.store}: docker://{ref}: ", "no space left on device")
    else:
        one_line_error(proc, f"{where / 'objects'}: No space left on device (adding ", "usr/share/big-text")
    assert published(t, tmp_path) == before
    fsck_clean(t)
    assert imgs["big"].digest not in store_digests(t, tmp_path)  # podman's own view

    # space freed: the same upgrade stages the image
    if full == "store":
        for part in t.fs.path.glob("filler*"):
            part.unlink()
    else:
        resize_tmpfs(where, tmpfs_used(where) + (512 << 20))
    proc = verb("upgrade", t, a, tmp_path)
    assert proc.returncode == 0, proc.stderr
    b = staged_id(tmp_path)
    assert sorted(os.listdir(t.root / "state/deploy")) == sorted([a, b])
    fsck_clean(t)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_cli("internals", "cfs", "--repo", t.root / "composefs", "mount", b, mnt)
    try:
        assert sha256(mnt / "usr/share/big-text") == hashlib.sha256(BIG_TEXT).hexdigest()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# --- a full ESP while staging -------------------------------------------------------------------------


def test_full_esp_during_staging(
    target: Target, res_images: dict[str, BootImage], tmp_path: Path, tmpfs_mounts: list[Path]
) -> None:
    t, imgs = target, res_images
    mount_tmpfs(t.esp, 16 << 20, tmpfs_mounts)
    install(t, "--allow-missing-verity", "--source-imgref", imgs["v1"].docker)
    a = deployment_id(t)
    # room for less than the other kernel (400 KB): its kernel dir cannot be written
    resize_tmpfs(t.esp, tmpfs_used(t.esp) + (200 << 10))
    before = published(t, tmp_path)
    assert before["esp"]  # the entry and the kernel dir

    proc = verb("switch", t, a, tmp_path, imgs["alt"].docker)
    one_line_error(proc, f"{t.esp / 'EFI/Linux'}: cannot write bootc_composefs-", "No space left on device")
    assert published(t, tmp_path) == before
    fsck_clean(t)
    # the booted deployment still boots: its entry is the only one, naming kernel files whose
    # bytes are the image's
    (conf,) = (t.esp / "loader/entries").iterdir()
    fields = dict(line.split(" ", 1) for line in conf.read_text().splitlines())
    assert f"composefs=?{a}" in fields["options"].split()
    kernel = (t.esp / fields["linux"].lstrip("/")).read_bytes()
    initrd = (t.esp / fields["initrd"].lstrip("/")).read_bytes()
    assert hashlib.sha256(kernel + initrd).hexdigest() == BOOT_DIGEST
    mountinfo, marker = booted_mountinfo(a, tmp_path), tmp_path / "staged-deployment"
    doc = json.loads(
        run_cli(
            *("status", "--sysroot", t.root, "--esp", t.esp, "--format", "json"),
            *("--mountinfo", mountinfo, "--staged-marker", marker),
        ).stdout
    )
    assert doc["status"]["booted"]["composefs"]["verity"] == a and doc["status"]["staged"] is None
    assert doc["status"]["rollbackQueued"] is False

    # room on the ESP: the same switch stages
    resize_tmpfs(t.esp, 16 << 20)
    proc = verb("switch", t, a, tmp_path, imgs["alt"].docker)
    assert proc.returncode == 0, proc.stderr
    b = staged_id(tmp_path)
    kdir = t.esp / "EFI/Linux" / f"bootc_composefs-{b}"
    assert (kdir / "vmlinuz").read_bytes() == OTHER_KERNEL[f"usr/lib/modules/{KVER}/vmlinuz"]
