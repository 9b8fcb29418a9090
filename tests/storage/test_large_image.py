"""A large real image end to end: the Debian trixie guest rootfs image (the VM tier's v1, hundreds
of MiB, tens of thousands of files), pulled from the local registry into a bootc-owned store on
each of btrfs, XFS and ext4.

Oracles: podman's DiffIDs and its own mount of the image; FIEMAP / inode identity; statvfs next to
the filesystem's own zero-copy copy (`cp -a --reflink=always` / `cp -al`) of the same diff trees.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bootc_unified.cstorage import Store, reassemble
from bootc_unified.imgstore import ImageStore
from bootc_unified.importer import layer_content_id
from bootc_unified.repository import Repository, splitstream
from harness.checks import all_extents_shared, fiemap
from harness.loopfs import LoopFs
from harness.pytest_vm import GuestImages
from harness.registry import Registry
from harness.treecompare import differences, snapshot_dir
from testsupport.plugin import run_cli
from testsupport.treeadd import sync_fs, tree_bytes, zero_copy_baseline

pytestmark = [pytest.mark.storage, pytest.mark.slow]


@pytest.fixture(scope="session")
def large_ref(guest_image: GuestImages, registry: Registry) -> str:
    """The v1 guest image in the local registry (uncompressed layers), as the host sees it."""
    return guest_image.builder.push(guest_image("v1"), registry.address, "bootc-unified/large:v1")


def test_large_image(loopfs: LoopFs, bootc_store: ImageStore, large_ref: str, tmp_path: Path) -> None:
    bootc_store.pull(large_ref, tls_verify=False)
    store = Store.open(bootc_store.root)
    image = store.image(large_ref)
    podman_layers = json.loads(bootc_store.podman(["image", "inspect", large_ref]).stdout)[0]["RootFS"][
        "Layers"
    ]
    assert [layer.diff_id for layer in image.layers] == podman_layers
    with store.read_lock():
        for layer in image.layers:
            assert reassemble(layer).digest == layer.diff_id  # bit-exact tar from tar-split + diff/
    files, image_bytes = 0, 0
    for layer in image.layers:
        n, size = tree_bytes(layer.diff_path)
        files, image_bytes = files + n, image_bytes + size
    assert files > 10_000 and image_bytes > 300 << 20, (files, image_bytes)

    # The filesystem's own zero-copy copy of the same diff trees: its metadata cost is the yardstick.
    baseline_extra = zero_copy_baseline(loopfs, [layer.diff_path for layer in image.layers]).extra_bytes

    repo = Repository.init(loopfs.path / "composefs", insecure=True)
    used = loopfs.statvfs_used_bytes()
    out = json.loads(
        run_cli(
            "internals",
            "cfs",
            "--repo",
            repo.path,
            "import",
            "--zerocopy",
            "--storage",
            store.root,
            large_ref,
        ).stdout
    )
    sync_fs(loopfs.path)
    extra = loopfs.statvfs_used_bytes() - used
    assert out["objects"]["copied"] == {"objects": 0, "bytes": 0}
    shared = out["objects"]["reflinked" if loopfs.kind != "ext4" else "hardlinked"]
    assert shared["objects"] > 5_000
    # No file data doubled. The import writes the layer streams (tar headers), the EROFS image
    # (the image's metadata) and the caches derived from them (parsed layers, flattened trees):
    # besides those, it may cost what the filesystem's own zero-copy copy of the same trees costs
    # (new inodes, extent references) plus under 1% of the image's bytes.
    written = sum(
        os.stat(p).st_size
        for top in ("streams", "images")
        for p in (repo.path / top).iterdir()
        if p.is_symlink()
    ) + sum(p.stat().st_size for p in (repo.path / "cache").rglob("*") if p.is_file())
    print(
        f"{loopfs.kind}: image {image_bytes} bytes in {files} files; extra {extra}; "
        f"baseline copy {baseline_extra}; streams + EROFS image {written}"
    )
    assert extra - written <= baseline_extra + image_bytes // 100, (
        extra,
        written,
        baseline_extra,
        image_bytes,
    )

    diff_inodes = {
        (st.st_dev, st.st_ino)
        for layer in image.layers
        for dirpath, _dirs, names in os.walk(layer.diff_path)
        for name in names
        if (st := os.lstat(os.path.join(dirpath, name))) and os.path.isfile(os.path.join(dirpath, name))
    }
    for layer in image.layers:
        stream = repo.open_stream(layer_content_id(layer.diff_id), splitstream.OCI_LAYER)
        for object_id in stream.object_refs:
            obj = repo.objects.path_of(object_id)
            st = os.stat(obj)
            if loopfs.kind == "ext4":
                assert (st.st_dev, st.st_ino) in diff_inodes
            elif not all(e.inline for e in fiemap(obj)):
                assert all_extents_shared(obj), obj

    image_path = repo.image_path(out["image_id"])
    subprocess.run(["fsck.erofs", str(image_path)], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_cli("internals", "cfs", "--repo", repo.path, "mount", out["image_id"], mnt)
    try:
        ours = snapshot_dir(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    podman_mnt = Path(bootc_store.podman(["image", "mount", large_ref]).stdout.strip())
    try:
        theirs = snapshot_dir(podman_mnt)
    finally:
        bootc_store.podman(["image", "unmount", large_ref])
    ours.records[b"/"] = theirs.records[b"/"]
    assert len(theirs.records) > 10_000
    assert differences(theirs, ours) == []
    assert run_cli("internals", "cfs", "--repo", repo.path, "fsck").returncode == 0
