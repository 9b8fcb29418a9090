"""The ostree backend's import from the bootc store into a bare ostree repository.

Oracles: a reference commit made the slow way (`ostree commit --tree=tar=` of each bit-exact layer
tar, union checkout with whiteouts, commit; testsupport/ostree_reference.py): its root dirtree and
dirmeta checksums must equal ours; `ostree fsck`; FIEMAP_EXTENT_SHARED between each content object
and its diff/ file (btrfs, XFS) or the object being the diff/ inode (ext4); statvfs before/after.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from bootc_unified.cstorage import Store
from bootc_unified.imgstore import ImageStore
from bootc_unified.ostree.gvariant import regular_checksum_fd
from bootc_unified.ostree.importer import image_ref
from bootc_unified.ostree.repo import OstreeRepo, ostree_version
from harness.checks import all_extents_shared, fiemap
from harness.loopfs import LoopFs
from harness.testimages import TestImages
from testsupport.ostree_reference import ostree, reference_commit
from testsupport.plugin import run_cli
from testsupport.treeadd import sync_fs, tree_bytes

pytestmark = pytest.mark.storage

# statvfs noise beyond the metadata written (journal, btrfs tree nodes); the features image holds
# over 1 MiB of file data, so a copy of it cannot hide in this.
SLACK = 256 << 10


def _import(repo: Path, storage: Path, ref: str, *extra: str) -> dict[str, object]:
    proc = run_cli("internals", "ostree", "--repo", repo, "import", "--storage", storage, *extra, ref)
    result = json.loads(proc.stdout)
    assert isinstance(result, dict)
    return result


def _diff_sources(store: Store, ref: str) -> dict[str, list[Path]]:
    """ostree checksum -> the diff/ files (regular, non-empty) that hold that content."""
    from bootc_unified.ostree.tree import Builder

    image = store.image(ref)
    out: dict[str, list[Path]] = {}
    b = Builder(retain_var=ostree_version() >= (2024, 3))
    for layer in image.layers:
        b.apply_layer(layer, "")
    for _p, node in b.tree.walk():
        source = getattr(node, "source", None)
        if source is not None:
            out.setdefault(node.checksum, []).append(source)  # type: ignore[union-attr]
    return out


@pytest.mark.parametrize("name", ["features", "small-a", "small-b"])
def test_import_equals_reference_commit(
    loopfs: LoopFs, bootc_store: ImageStore, test_images: TestImages, name: str
) -> None:
    ref = test_images[name].ref
    bootc_store.pull(ref, tls_verify=False)
    ours = OstreeRepo.init(loopfs.path / "ours")
    result = _import(ours.path, bootc_store.root, ref)
    ours.fsck()
    assert ours.resolve(str(result["ref"])) == result["commit"]
    assert result["ref"] == image_ref(f"registry:{ref}")

    theirs = OstreeRepo.init(loopfs.path / "theirs")
    store = Store.open(bootc_store.root)
    image = store.image(ref)
    reference = reference_commit(
        theirs.path, image, loopfs.path / "work", retain_var=ostree_version() >= (2024, 3)
    )
    assert ours.root_checksums(str(result["commit"])) == theirs.root_checksums(reference.commit)
    # the commit metadata bootc reads back
    digest = ostree(
        "show", f"--repo={ours.path}", "--print-metadata-key=ostree.manifest-digest", str(result["commit"])
    )
    assert digest.strip() == f"'{image.manifest_digest}'"
    manifest = ostree(
        "show", f"--repo={ours.path}", "--print-metadata-key=ostree.manifest", str(result["commit"])
    )
    assert image.config_digest in manifest
    if name == "features":  # what the tree must show (so equal checksums are not equally empty)
        listing = ostree("ls", f"--repo={ours.path}", "-R", "-X", str(result["commit"]))
        paths = {line.split()[-1] for line in listing.splitlines() if line.strip()}
        assert "/later/opaque/new" in paths and "/sizes/1MiB+1" in paths and "/hardlinks/sub/c" in paths
        assert not {"/later/opaque/old-a", "/later/deleted", "/special/null"} & paths
        assert "security.capability" in listing and "user.bootc-test" in listing
        assert result["special_skipped"] == 3  # the FIFO, the device, the non-UTF-8 name


def test_import_is_zero_copy(loopfs: LoopFs, bootc_store: ImageStore, test_images: TestImages) -> None:
    ref = test_images["features"].ref
    bootc_store.pull(ref, tls_verify=False)
    store = Store.open(bootc_store.root)
    image = store.image(ref)
    file_bytes = sum(tree_bytes(layer.diff_path)[1] for layer in image.layers)
    repo = OstreeRepo.init(loopfs.path / "repo")
    sync_fs(loopfs.path)
    before = loopfs.statvfs_used_bytes()
    result = _import(repo.path, bootc_store.root, ref)
    sync_fs(loopfs.path)
    extra = loopfs.statvfs_used_bytes() - before
    repo_meta = sum(
        os.lstat(Path(d) / f).st_blocks * 512
        for d, _dirs, files in os.walk(repo.path)
        for f in files
        if not f.endswith(".file")
    )
    assert SLACK + repo_meta < file_bytes // 2, (repo_meta, file_bytes)  # else the check could not fail
    assert extra <= repo_meta + SLACK, (
        f"import used {extra} bytes; metadata {repo_meta}, file data {file_bytes}"
    )

    objects = result["objects"]
    assert isinstance(objects, dict)
    assert objects["copied"] == {"objects": 0, "bytes": 0}
    shared = objects["hardlinked" if loopfs.kind == "ext4" else "reflinked"]
    assert shared["objects"] > 0 and shared["bytes"] > 1 << 20

    sources = _diff_sources(store, ref)
    assert sources
    for checksum, paths in sources.items():
        obj = repo.object_path(checksum)
        st = os.lstat(obj)
        assert stat.S_ISREG(st.st_mode)
        fd = os.open(obj, os.O_RDONLY)  # the object is what its name says (ostree's own fsck too)
        try:
            xattrs = {os.fsencode(n): os.getxattr(fd, n) for n in os.listxattr(fd)}
            assert regular_checksum_fd(fd, st.st_uid, st.st_gid, st.st_mode, xattrs) == checksum
        finally:
            os.close(fd)
        if loopfs.kind == "ext4":
            inodes = {(os.stat(p).st_dev, os.stat(p).st_ino) for p in paths}
            assert st.st_nlink >= 2 and (st.st_dev, st.st_ino) in inodes, obj
        elif not all(e.inline for e in fiemap(obj)):
            assert all_extents_shared(obj), obj  # btrfs keeps tiny files inline, where FICLONE copies
    repo.fsck()

    # a second import of the same image writes no object
    again = _import(repo.path, bootc_store.root, ref)
    placed = again["objects"]
    assert isinstance(placed, dict)
    assert all(v["objects"] == 0 for k, v in placed.items() if k != "already-present")
    assert again["commit"] == result["commit"]
