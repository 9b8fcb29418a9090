"""Guest image variants, built from images/guest/*.toml: layer structure and content changes."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import tomllib

import pytest

from harness.images import load_variant, variant_names
from harness.images.definitions import REPO_ROOT
from harness.pytest_vm import GuestImages

pytestmark = pytest.mark.vm


def test_definitions_load() -> None:
    assert {"v1", "v2", "alt", "app"} <= set(variant_names())
    for name in variant_names():
        assert load_variant(name).layers


def test_variants_share_layers(guest_image: GuestImages) -> None:
    v1, v2, alt, app = (guest_image(v) for v in ("v1", "v2", "alt", "app"))
    assert len(v1.layers) == 3  # base OS, our package (and what makes it bootable), version
    assert v2.layers[:3] == v1.layers and len(v2.layers) == 4  # one new layer on top of v1
    assert alt.layers[:2] == v1.layers[:2] and alt.layers[2] != v1.layers[2]
    assert not set(app.layers) & set(v1.layers)
    assert guest_image("v1") is v1  # cached per session


def test_v2_adds_changes_and_removes(guest_image: GuestImages) -> None:
    builder = guest_image.builder
    with builder.rootfs(guest_image("v1")) as root:
        files = root / "usr/share/bootc-unified"
        v1 = {p.name: p.read_text() for p in files.iterdir()}
        assert (root / "usr/lib/python3/dist-packages/bootc_unified/__init__.py").is_file()
        assert (root / "usr/bin/bootc-unified").stat().st_mode & 0o111
    with builder.rootfs(guest_image("v2")) as root:
        v2 = {p.name: p.read_text() for p in (root / "usr/share/bootc-unified").iterdir()}
        assert (root / "usr/lib/bootc-unified/version").read_text() == "v2\n"
    assert set(v2) - set(v1) == {"added-in-v2.txt"}
    assert set(v1) - set(v2) == {"removed-in-v2.txt"}
    assert v1["changed.txt"] != v2["changed.txt"]
    assert v1["unchanged.txt"] == v2["unchanged.txt"]


def test_second_build_is_cached(guest_image: GuestImages) -> None:
    guest_image("v1")
    again = guest_image.builder.build("v1")
    assert again.built_seconds == 0.0
    assert again.image_id == guest_image("v1").image_id


def initramfs_members(data: bytes) -> dict[str, bytes]:
    """Files of an initramfs: concatenated newc cpio archives, each plain, gzip or zstd."""
    members: dict[str, bytes] = {}
    while data:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        elif data[:4] == b"\x28\xb5\x2f\xfd":
            data = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
        elif data[:6] != b"070701":
            raise ValueError(f"unknown initramfs segment {data[:8]!r}")
        off = 0
        while data[off : off + 6] == b"070701":
            namesize, filesize = int(data[off + 94 : off + 102], 16), int(data[off + 54 : off + 62], 16)
            name = data[off + 110 : off + 110 + namesize - 1].decode()
            off = (off + 110 + namesize + 3) & ~3
            members[name] = data[off : off + filesize]
            off = (off + filesize + 3) & ~3
        data = data[off:].lstrip(b"\0")
    return members


def os_release(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    return {k: v.strip('"') for k, v in pairs}


def test_images_are_bootable(guest_image: GuestImages) -> None:
    """bootc's layout: kernel and an initramfs carrying our early-boot script (bytes of the working
    tree) in /usr/lib/modules/<kver>/, os-release per variant, the bootc store as podman's
    additional image store with every other storage.conf setting kept, kargs.d, units enabled."""
    builder = guest_image.builder
    source = REPO_ROOT / "bootc_unified/boot/initramfs"
    identities = set()
    for variant in ("v1", "v2", "alt"):
        image = guest_image(variant)
        inspected = json.loads(builder.buildah("inspect", "--type", "image", image.tag))
        labels = inspected["OCIv1"]["config"]["Labels"]
        assert labels["containers.bootc"] == "1"
        with builder.rootfs(image) as root:
            release = os_release((root / "usr/lib/os-release").read_text())
            identities.add((release["ID"], release["VERSION_ID"], release["PRETTY_NAME"]))
            assert os.readlink(root / "etc/os-release") == "../usr/lib/os-release"
            if variant != "v1":
                continue
            (kver,) = [p.name for p in (root / "usr/lib/modules").iterdir()]
            modules = root / "usr/lib/modules" / kver
            assert (modules / "vmlinuz").read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage
            members = initramfs_members((modules / "initramfs.img").read_bytes())
            script = "scripts/local-bottom/bootc-unified"
            assert members[script] == (source / script).read_bytes()
            for path in ("usr/lib/bootc-unified/bin/mount", "usr/lib/bootc-unified/bin/fsverity"):
                assert path in members
            for module in ("kernel/fs/erofs/erofs.ko", "kernel/fs/overlayfs/overlay.ko"):
                assert any(m.startswith(f"usr/lib/modules/{kver}/{module}") for m in members), module
            assert (root / "boot" / f"initrd.img-{kver}").resolve() == (modules / "initramfs.img").resolve()

            assert os.readlink(root / "usr/lib/bootc/storage") == "../../../sysroot/ostree/bootc/storage"
            assert (root / "sysroot").is_dir()
            shipped = tomllib.loads((root / "usr/share/containers/storage.conf").read_text())
            ours = tomllib.loads((root / "etc/containers/storage.conf").read_text())
            assert ours["storage"]["options"].pop("additionalimagestores") == ["/usr/lib/bootc/storage"]
            shipped["storage"]["options"].pop("additionalimagestores", None)
            assert ours == shipped
            assert shipped["storage"]["options"]["overlay"]["mountopt"] == "nodev"
            kargs = tomllib.loads((root / "usr/lib/bootc/kargs.d/10-test.toml").read_text())
            assert kargs == {"kargs": ["bootc_unified.test=1"]}
            enabled = {p.name for p in (root / "etc/systemd/system").glob("*.wants/*") if p.is_symlink()}
            for unit in (REPO_ROOT / "bootc_unified/boot/units").glob("*.service"):
                assert (root / "usr/lib/systemd/system" / unit.name).read_bytes() == unit.read_bytes()
                # units with an [Install] section are enabled; the others are started by our verbs
                # (bootc-unified-finalize-staged.service: upgrade starts it, it stops at shutdown)
                has_install = "[Install]" in (line.strip() for line in unit.read_text().splitlines())
                assert (unit.name in enabled) == has_install, unit.name
            fstab = [line.split() for line in (root / "etc/fstab").read_text().splitlines()]
            assert not [f for f in fstab if f and not f[0].startswith("#") and len(f) > 1 and f[1] == "/"]
    assert len(identities) == 3, identities
