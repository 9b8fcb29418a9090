"""Import from a bootc-owned containers-storage into a composefs repository on the same filesystem.

Oracles: podman's own DiffIDs (image inspect), sha256 of the tar reassembled from our splitstreams,
FIEMAP_EXTENT_SHARED / inode identity between each object and its diff/ file, statvfs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from bootc_unified.cstorage import Store
from bootc_unified.imgstore import ImageStore
from bootc_unified.importer import import_image, layer_content_id
from bootc_unified.layertree import flatten
from bootc_unified.repository import Method, Repository, splitstream
from harness.checks import all_extents_shared, fiemap
from harness.loopfs import LoopFs
from harness.pytest_plugin import run_cli
from harness.testimages import TestImages
from harness.treecompare import Snapshot, differences, snapshot_dir, snapshot_tree

pytestmark = pytest.mark.storage


@pytest.fixture
def store(bootc_store: ImageStore) -> ImageStore:
    return bootc_store


def podman_diff_ids(store: ImageStore, ref: str) -> list[str]:
    out = store.podman(["image", "inspect", ref]).stdout
    return list(json.loads(out)[0]["RootFS"]["Layers"])


def test_import_is_zero_copy_and_bit_exact(
    loopfs: LoopFs, store: ImageStore, test_images: TestImages
) -> None:
    ref = test_images["features"].ref
    store.pull(ref, tls_verify=False)
    repo = Repository.init(loopfs.path / "composefs", insecure=True)
    used_before = loopfs.statvfs_used_bytes()

    proc = run_cli(
        "internals", "cfs", "--repo", repo.path, "import", "--zerocopy", "--storage", store.root, ref
    )
    result = json.loads(proc.stdout)
    objects = result["objects"]
    assert objects["copied"] == {"objects": 0, "bytes": 0}
    shared = objects["reflinked" if loopfs.kind != "ext4" else "hardlinked"]
    assert shared["objects"] > 0

    diff_ids = podman_diff_ids(store, ref)
    assert result["layers"] == {"imported": len(set(diff_ids)), "present": 0}
    cstore = Store.open(store.root)
    image = cstore.image(ref)
    diff_inodes = {
        (st.st_dev, st.st_ino)
        for layer in image.layers
        for p in layer.diff_path.rglob("*")
        if p.is_file() and not p.is_symlink() and (st := p.stat())
    }
    for layer in image.layers:
        stream = repo.open_stream(layer_content_id(layer.diff_id), splitstream.OCI_LAYER)
        tar = b"".join(repo.cat_stream(stream))
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == layer.diff_id
        assert stream.size == len(tar)
        for object_id in stream.object_refs:
            obj = repo.objects.path_of(object_id)
            st = os.stat(obj)
            if loopfs.kind == "ext4":  # hardlinked: the object is a diff/ file's inode
                assert st.st_nlink >= 2 and (st.st_dev, st.st_ino) in diff_inodes
            elif not all(e.inline for e in fiemap(obj)):
                # btrfs keeps files under 2 KiB inline in metadata, where FICLONE copies them
                assert all_extents_shared(obj)
    assert [layer.diff_id for layer in image.layers] == diff_ids

    os.sync()
    extra = loopfs.statvfs_used_bytes() - used_before
    data = objects["reflinked"]["bytes"] + objects["hardlinked"]["bytes"]
    assert extra < data or extra < 4 << 20, (extra, data)

    assert run_cli("internals", "cfs", "--repo", repo.path, "fsck").returncode == 0
    refs = run_cli("internals", "cfs", "--repo", repo.path, "ls-refs").stdout
    assert refs.startswith("streams/refs/oci/127.0.0.1%3A") is False  # ':' is kept, '/' escaped
    assert "streams/refs/oci/127.0.0.1:" in refs and "%2Fbootc-unified-test%2Ffeatures-gzip:latest" in refs


@pytest.mark.fs("xfs")
def test_reimport_reads_no_file_data(loopfs: LoopFs, store: ImageStore, test_images: TestImages) -> None:
    a, b = test_images["small-a"].ref, test_images["small-b"].ref
    store.pull(a, tls_verify=False)
    store.pull(b, tls_verify=False)
    repo = Repository.init(loopfs.path / "composefs", insecure=True)
    cstore = Store.open(store.root)
    first = import_image(repo, cstore, a)
    objects_before = sorted(p for p in (repo.path / "objects").rglob("*") if p.is_file())
    again = import_image(repo, cstore, a)
    assert again.layers_imported == 0 and again.layers_present == first.layers_imported
    assert again.stats.objects == 0
    assert sorted(p for p in (repo.path / "objects").rglob("*") if p.is_file()) == objects_before
    # small-b is built on small-a: the shared base layer is not imported again
    second = import_image(repo, cstore, b)
    assert second.layers_present >= 1 and second.layers_imported >= 1
    assert second.stats.by_method[Method.COPIED].objects == 0


def podman_view(store: ImageStore, ref: str) -> Snapshot:
    """podman's own merged view of the image (`podman image mount`), path by path."""
    mountpoint = Path(store.podman(["image", "mount", ref]).stdout.strip())
    try:
        return snapshot_dir(mountpoint)
    finally:
        store.podman(["image", "unmount", ref])


@pytest.mark.parametrize("name", ["features", "small-b"])
def test_flattened_tree_equals_podman_view(
    loopfs: LoopFs, store: ImageStore, test_images: TestImages, name: str
) -> None:
    ref = test_images[name].ref
    store.pull(ref, tls_verify=False)
    repo = Repository.init(loopfs.path / "composefs", insecure=True)
    image = Store.open(store.root).image(ref)
    import_image(repo, Store.open(store.root), ref)
    layers = [
        (layer.diff_id, repo.has_stream(layer_content_id(layer.diff_id)) or "") for layer in image.layers
    ]
    ours = snapshot_tree(flatten(repo, layers), repo.read_object)
    theirs = podman_view(store, ref)
    ours.records[b"/"] = theirs.records[b"/"]  # the root's metadata is podman's own choice
    assert differences(theirs, ours) == []


@pytest.mark.parametrize(
    ("name", "compression"),
    [("features", "gzip"), ("features", "zstd"), ("small-a", "gzip"), ("small-b", "gzip")],
)
def test_mounted_image_equals_podman_view(
    loopfs: LoopFs, store: ImageStore, test_images: TestImages, name: str, compression: str, tmp_path: Path
) -> None:
    """The kernel mounts our EROFS image (erofs + overlay with a data-only lower) and sees what
    podman sees, path by path; fsck.erofs accepts the image."""
    ref = test_images[name].refs[compression]
    store.pull(ref, tls_verify=False)
    repo = Repository.init(loopfs.path / "composefs", insecure=True)
    result = json.loads(
        run_cli("internals", "cfs", "--repo", repo.path, "import", "--storage", store.root, ref).stdout
    )
    image_id = result["image_id"]
    image = repo.image_path(image_id)
    subprocess.run(["fsck.erofs", str(image)], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_cli("internals", "cfs", "--repo", repo.path, "mount", ref, mnt)  # by name, then by ID
    try:
        ours = snapshot_dir(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    run_cli("internals", "cfs", "--repo", repo.path, "mount", image_id, mnt)
    try:
        assert differences(ours, snapshot_dir(mnt)) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    theirs = podman_view(store, ref)
    ours.records[b"/"] = theirs.records[b"/"]
    assert differences(theirs, ours) == []
    # create-image is deterministic: the same layers give the same image
    again = run_cli("internals", "cfs", "--repo", repo.path, "create-image", ref).stdout.strip()
    assert again == image_id
