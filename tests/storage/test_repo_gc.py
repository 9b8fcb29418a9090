"""Repository GC: removing one of two image refs removes exactly what only that image used."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bootc_unified.erofs.mount import mounted
from bootc_unified.imgstore import ImageStore
from bootc_unified.importer import image_ref_name
from harness.loopfs import LoopFs
from harness.testimages import TestImages
from harness.treecompare import differences, snapshot_dir
from testsupport.plugin import run_cli

pytestmark = pytest.mark.storage


@pytest.fixture
def store(bootc_store: ImageStore) -> ImageStore:
    return bootc_store


def fsverity_digests(root: Path) -> set[str]:
    """Object IDs of an image's external files, from `fsverity digest` of podman's view (> 64 bytes)."""
    files = [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size > 64]
    out = subprocess.run(
        ["fsverity", "digest", "--hash-alg=sha512", *files], check=True, capture_output=True, text=True
    ).stdout
    return {line.split()[0].split(":", 1)[1] for line in out.splitlines()}


def objects(repo: Path) -> set[str]:
    return {p.parent.name + p.name for p in (repo / "objects").glob("*/*")}


def test_gc_removes_exactly_the_unshared_objects(
    loopfs: LoopFs, store: ImageStore, test_images: TestImages, tmp_path: Path
) -> None:
    keep, drop = test_images["small-a"].ref, test_images["features"].ref
    repo = loopfs.path / "composefs"
    run_cli("internals", "cfs", "--repo", repo, "init", "--insecure")
    views = {}
    for ref in (keep, drop):
        store.pull(ref, tls_verify=False)
        run_cli("internals", "cfs", "--repo", repo, "import", "--storage", store.root, ref)
        mnt = Path(store.podman(["image", "mount", ref]).stdout.strip())
        views[ref] = (snapshot_dir(mnt), fsverity_digests(mnt))
        store.podman(["image", "unmount", ref])
    keep_image = json.loads(
        run_cli("internals", "cfs", "--repo", repo, "import", "--storage", store.root, keep).stdout
    )["image_id"]
    only_dropped = views[drop][1] - views[keep][1]
    assert only_dropped, "the test images must have contents of their own"
    before = objects(repo)
    assert views[keep][1] | views[drop][1] <= before

    # nothing is unreachable yet
    dry = json.loads(run_cli("internals", "cfs", "--repo", repo, "gc", "--dry-run").stdout)
    assert dry["removed_objects"] == 0

    for kind in ("streams", "images"):
        (repo / kind / "refs" / image_ref_name(drop)).unlink()
    dry = json.loads(run_cli("internals", "cfs", "--repo", repo, "gc", "--dry-run").stdout)
    assert objects(repo) == before, "--dry-run removes nothing"
    done = json.loads(run_cli("internals", "cfs", "--repo", repo, "gc").stdout)
    assert done["objects"] == dry["objects"]
    after = objects(repo)
    assert only_dropped.isdisjoint(after)
    assert views[keep][1] <= after
    assert set(done["objects"]) == before - after
    # what went besides file contents: the dropped image's EROFS image and its own streams
    assert len(before - after) > len(only_dropped)
    assert run_cli("internals", "cfs", "--repo", repo, "fsck").returncode == 0

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(repo / "objects" / keep_image[:2] / keep_image[2:], repo / "objects", mnt):
        ours = snapshot_dir(mnt)
    theirs = views[keep][0]
    ours.records[b"/"] = theirs.records[b"/"]
    assert differences(theirs, ours) == []

    # the store's files (shared with removed objects by reflink or hardlink) are intact for podman
    mnt2 = Path(store.podman(["image", "mount", drop]).stdout.strip())
    try:
        assert differences(views[drop][0], snapshot_dir(mnt2)) == []
    finally:
        store.podman(["image", "unmount", drop])
