"""Storage-tier helpers for deployments on a loop sysroot: small bootable test images built with
buildah (a kernel + initramfs as small files under /usr/lib/modules/<kver>/, os-release, kargs.d,
/etc and /var content), the `target` fixture (a loop filesystem with root/ and esp/ directories;
the host cannot mount vfat, so the ESP is a plain directory), `install to-filesystem` and
`status` run on it as if booted (a hand-written mountinfo), and the oracles the tests share:
podman's own view of a store, the kernel mounting a deployment's EROFS image, FIEMAP sharing and
inode identity between objects and store files.

Used by tests/storage/test_install.py, test_gc_both.py, test_stage_finalize.py, test_upgrade.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootc_unified.cstorage import Store
from bootc_unified.importer import layer_content_id
from bootc_unified.repository import Repository, splitstream
from harness.checks import all_extents_shared, fiemap
from harness.loopfs import LoopFs
from harness.run import run
from harness.scratchpodman import ScratchPodman
from harness.testimages import Buildah
from harness.treecompare import Snapshot, snapshot_dir
from testsupport.plugin import run_cli

KVER = "6.1.0-bootc-test"
VERSION_ANNOTATION = "org.opencontainers.image.version"


def blob(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


KERNEL = blob("vmlinuz", 300_000)
INITRAMFS = blob("initramfs", 120_000)
BOOT_DIGEST = hashlib.sha256(KERNEL + INITRAMFS).hexdigest()
KERNEL_FILES = {f"usr/lib/modules/{KVER}/vmlinuz": KERNEL, f"usr/lib/modules/{KVER}/initramfs.img": INITRAMFS}


def os_release(version: str) -> bytes:
    text = f'NAME="Bootc Test"\nID=bootc-test\nVERSION_ID={version}\nPRETTY_NAME="Bootc Test {version}"\n'
    return text.encode()


def base_files(version: str) -> dict[str, bytes]:
    return {
        "usr/lib/os-release": os_release(version),
        "usr/lib/bootc/kargs.d/10-console.toml": b'kargs = ["console=ttyS0", "quiet"]\n',
        "usr/lib/bootc/kargs.d/20-s390x.toml": b'match-architectures = ["s390x"]\nkargs = ["not-here"]\n',
        "usr/bin/tool": blob("tool", 200_000),
        "usr/share/big": blob("big" + version, 1 << 20),
        "etc/hostname": b"bootc-test\n",
        "etc/.updated": b"",
        "etc/sub/dir/file": blob("etcfile", 5000),
        "var/lib/app/data": blob("vardata", 100),
    }


@dataclass(frozen=True)
class BootImage:
    name: str
    ref: str  # 127.0.0.1:PORT/bootc-unified-test/<name>-gzip:latest
    digest: str  # the registry's manifest digest
    version: str

    @property
    def docker(self) -> str:
        return f"docker://{self.ref}"


def build(
    b: Buildah,
    name: str,
    version: str,
    files: dict[str, bytes],
    links: dict[str, str] | None = None,
    dirs: tuple[str, ...] = (),
    etc_extras: bool = False,
) -> None:
    """Commit `localhost/<name>:latest` from scratch: `files`, symlinks `links` (path -> target),
    empty `dirs`; `etc_extras`: var/cache, etc/hostname-link and an etc file owned by 1000 with
    mode 0600 and a user xattr. Annotated with `version`, amd64/linux, a fixed timestamp."""
    container = b("from", "--pull-never", "scratch")
    root = Path(b("mount", container))
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for rel, dest in (links or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(dest, root / rel)
    for rel in dirs:
        (root / rel).mkdir(parents=True, exist_ok=True)
    if etc_extras:
        (root / "var/cache").mkdir(parents=True)
        os.symlink("hostname", root / "etc/hostname-link")
        secret = root / "etc/secret.conf"
        secret.write_bytes(b"owned by 1000\n")
        os.chown(secret, 1000, 1000)
        os.chmod(secret, 0o600)
        os.setxattr(secret, "user.bootc-test", b"etc-xattr")
    b(
        "config",
        "--annotation",
        f"{VERSION_ANNOTATION}={version}",
        "--arch",
        "amd64",
        "--os",
        "linux",
        container,
    )
    b("commit", "--quiet", "--rm", "--timestamp", "1700000000", container, f"localhost/{name}:latest")


# --- the target: a loop filesystem with root/ and esp/ ------------------------------------------------


@dataclass
class Target:
    fs: LoopFs
    root: Path
    esp: Path

    @property
    def repo(self) -> Repository:
        return Repository.open(self.root / "composefs")

    @property
    def store(self) -> Path:
        return self.root / "ostree/bootc/storage"


@pytest.fixture
def target(loopfs: LoopFs) -> Iterator[Target]:
    root, esp = loopfs.path / "root", loopfs.path / "esp"  # the host cannot mount vfat: a plain dir
    root.mkdir()
    esp.mkdir()
    yield Target(loopfs, root, esp)
    subprocess.run(["umount", "-R", str(root / "ostree/bootc/storage/overlay")], capture_output=True)


def install(t: Target, *args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "install", "to-filesystem", t.root, "--boot-esp", t.esp, "--tls-verify", "false", *args, check=check
    )


def podman_on(store: Path, workdir: Path) -> ScratchPodman:
    """podman's own view of a store (its own configuration, nothing of ours)."""
    return ScratchPodman(workdir, graphroot=store)


def podman_tree(pm: ScratchPodman, ref: str) -> Snapshot:
    mnt = Path(pm("image", "mount", ref))
    try:
        return snapshot_dir(mnt)
    finally:
        pm("image", "unmount", ref)


def the_entry(t: Target) -> tuple[Path, dict[str, str]]:
    entries = sorted((t.esp / "loader/entries").glob("*.conf"))
    assert len(entries) == 1, entries
    lines = entries[0].read_text().splitlines()
    return entries[0], {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in lines}


def deployment_id(t: Target) -> str:
    ids = os.listdir(t.root / "state/deploy")
    assert len(ids) == 1, ids
    return ids[0]


def fs_uuid(device: str) -> str:
    return run(["blkid", "-o", "value", "-s", "UUID", device]).stdout.strip()


def mounted_image(t: Target, depl_id: str, mnt: Path) -> Snapshot:
    mnt.mkdir(exist_ok=True)
    run_cli("internals", "cfs", "--repo", t.root / "composefs", "mount", depl_id, mnt)
    try:
        return snapshot_dir(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def sub_snapshot(snap: Snapshot, prefix: bytes, drop: tuple[bytes, ...] = ()) -> Snapshot:
    """The part of a snapshot under `prefix`, re-rooted (hardlink groups ignored)."""
    records = {}
    for path, rec in snap.records.items():
        if path == prefix or path.startswith(prefix + b"/"):
            rel = path[len(prefix) :] or b"/"
            if rel not in drop:
                records[rel] = rec
    return Snapshot(records, [])


def booted_mountinfo(depl_id: str, tmp: Path) -> Path:
    """A mountinfo as a system booted from `depl_id` has it (`/` = composefs:<id>)."""
    mountinfo = tmp / f"mountinfo-{depl_id[:12]}"
    mountinfo.write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        f"36 1 0:40 / / ro,relatime shared:1 - overlay composefs:{depl_id} ro,lowerdir+=/x\n"
        "40 36 7:0 / /sysroot ro,relatime shared:2 - ext4 /dev/vda2 ro\n"
    )
    return mountinfo


def status(
    t: Target, depl_id: str, tmp: Path, *args: str, marker: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "status",
        "--sysroot",
        t.root,
        "--esp",
        t.esp,
        "--mountinfo",
        booted_mountinfo(depl_id, tmp),
        "--staged-marker",
        marker or tmp / "no-marker",
        *args,
    )


def diff_inodes(store: Path, ref: str) -> dict[tuple[int, int], Path]:
    image = Store.open(store).image(ref)
    return {
        (st.st_dev, st.st_ino): p
        for layer in image.layers
        for p in layer.diff_path.rglob("*")
        if p.is_file() and not p.is_symlink() and (st := p.stat())
    }


def assert_zero_copy(t: Target, store: Path, ref: str) -> int:
    """Every object of the image's layer streams shares its data with the store's diff/ file."""
    repo = t.repo
    image = Store.open(store).image(ref)
    inodes = diff_inodes(store, ref)
    by_content = {
        hashlib.sha256(p.read_bytes()).hexdigest(): p for p in inodes.values() if p.stat().st_size > 64
    }
    checked = 0
    for layer in image.layers:
        stream = repo.open_stream(layer_content_id(layer.diff_id), splitstream.OCI_LAYER)
        for object_id in stream.object_refs:
            obj = repo.objects.path_of(object_id)
            st = obj.stat()
            assert st.st_size > 64
            if t.fs.kind == "ext4":
                assert (st.st_dev, st.st_ino) in inodes, obj
            else:
                source = by_content[hashlib.sha256(obj.read_bytes()).hexdigest()]
                if not all(e.inline for e in fiemap(obj)):
                    assert all_extents_shared(obj) and all_extents_shared(source), obj
            checked += 1
    assert checked > 0
    return checked


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))
