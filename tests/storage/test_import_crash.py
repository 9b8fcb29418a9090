"""Crash safety of the import: a real SIGKILL at 24 points (objects, streams, links, image, refs)
always leaves a repository that fsck accepts and no ref; running the import again completes.

Oracles besides our own fsck: the `fsverity digest` tool (fs-verity-utils) recomputes every object's
digest, which must be its name; the kernel mounts the resulting EROFS image, and it must show what
podman's own mount of the image shows, path by path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bootc_unified.imgstore import ImageStore
from harness.loopfs import LoopFs
from harness.pytest_plugin import require
from harness.testimages import TestImages
from harness.treecompare import Snapshot, differences, snapshot_dir
from testsupport.plugin import run_cli

pytestmark = pytest.mark.storage

POINTS = [
    "object-before-link:1",
    "object-before-link:2",
    "object-before-link:4",
    "object-after-link:1",
    "object-after-link:3",
    "import-layer-entry:1",
    "import-layer-entry:3",
    "import-layer-entry:7",
    "import-layer-entry:12",
    "import-layer-before-publish:1",
    "import-layer-before-publish:2",
    "object-after-link:6",
    "link-before-rename:1",
    "link-before-rename:2",
    "link-before-rename:3",
    "link-before-rename:4",
    "link-before-rename:5",
    "link-before-rename:6",
    "link-before-rename:7",
    "create-image-before-store:1",
    "import-after-config:1",
    "import-after-manifest:1",
    "import-after-ref:1",
    "object-before-link:9",
]


@pytest.fixture
def pulled(bootc_store: ImageStore, test_images: TestImages) -> tuple[ImageStore, str]:
    ref = test_images["features"].ref
    bootc_store.pull(ref, tls_verify=False)
    return bootc_store, ref


def fsverity_mismatches(repo: Path) -> tuple[int, list[str]]:
    """(objects checked, objects whose name is not their digest per the `fsverity` tool), with the
    hash algorithm of the repository's meta.json (fsverity-<alg>-12: 4096-byte blocks)."""
    algorithm = json.loads((repo / "meta.json").read_text())["algorithm"]
    prefix, alg, blockbits = algorithm.split("-")
    assert prefix == "fsverity" and blockbits == "12", algorithm
    objects = sorted(p for p in (repo / "objects").glob("??/*") if p.is_file() and not p.is_symlink())
    proc = subprocess.run(
        ["fsverity", "digest", f"--hash-alg={alg}", "--block-size=4096", *map(str, objects)],
        check=True,
        capture_output=True,
        text=True,
    )
    digests = [line.split(" ", 1) for line in proc.stdout.splitlines()]
    assert [Path(path) for _, path in digests] == objects
    bad = [
        f"{path}: {digest}"
        for (digest, path), obj in zip(digests, objects, strict=True)
        if digest != f"{alg}:{obj.parent.name}{obj.name}"
    ]
    return len(objects), bad


def mounted_view(repo: Path, ref: str, mnt: Path) -> Snapshot:
    """The kernel's view of the repository's image of `ref` (erofs + overlay)."""
    run_cli("internals", "cfs", "--repo", repo, "mount", ref, mnt)
    try:
        return snapshot_dir(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def podman_view(store: ImageStore, ref: str) -> Snapshot:
    mountpoint = Path(store.podman(["image", "mount", ref]).stdout.strip())
    try:
        return snapshot_dir(mountpoint)
    finally:
        store.podman(["image", "unmount", ref])


def stream_refs(repo: Path) -> list[Path]:
    """Refs, without the temporary links a kill can leave (fsck ignores them, GC removes them)."""
    return [
        p for p in (repo / "streams" / "refs").rglob("*") if p.is_symlink() and not p.name.startswith(".tmp-")
    ]


@pytest.mark.fs("xfs", "ext4")
def test_kill_anywhere_then_fsck_and_rerun(
    loopfs: LoopFs, pulled: tuple[ImageStore, str], tmp_path: Path
) -> None:
    assert len(set(POINTS)) >= 20
    require([] if shutil.which("fsverity") else ["fsverity (fsverity-utils)"], "checking object digests")
    store, ref = pulled
    theirs = podman_view(store, ref)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    import_args = ["import", "--zerocopy", "--storage", str(store.root), ref]
    for n, point in enumerate(POINTS):
        repo = loopfs.path / f"composefs-{n}"
        run_cli("internals", "cfs", "--repo", repo, "init", "--insecure")
        crashed = run_cli(
            "internals",
            "cfs",
            "--repo",
            repo,
            *import_args,
            check=False,
            env={"BOOTC_UNIFIED_CRASH_AT": point},
        )
        assert crashed.returncode == -9, f"{point}: the import did not reach this point ({crashed.stderr})"
        fsck = run_cli("internals", "cfs", "--repo", repo, "fsck", check=False)
        assert fsck.returncode == 0, f"after a kill at {point}: {fsck.stdout}{fsck.stderr}"
        if point != "import-after-ref:1":
            image_refs = [p for p in stream_refs(repo) if p.name.endswith("features-gzip:latest")]
            assert image_refs == [], f"a kill at {point} published the ref"
        run_cli("internals", "cfs", "--repo", repo, *import_args)
        assert run_cli("internals", "cfs", "--repo", repo, "fsck").returncode == 0
        assert len(stream_refs(repo)) == 1
        run_cli("internals", "cfs", "--repo", repo, "gc")
        assert list(repo.rglob(".tmp-*")) == []
        assert run_cli("internals", "cfs", "--repo", repo, "fsck").returncode == 0
        checked, bad = fsverity_mismatches(repo)
        assert checked > 10 and bad == [], f"after a kill at {point} and a re-run, {len(bad)} bad: {bad[:3]}"
        ours = mounted_view(repo, ref, mnt)
        ours.records[b"/"] = theirs.records[b"/"]  # the root's metadata is podman's own choice
        assert differences(theirs, ours) == [], f"after a kill at {point} and a re-run"


@pytest.mark.parametrize("way", ["recover", "reimport-without-marker"])
def test_objects_a_power_cut_emptied_are_replaced(
    loopfs: LoopFs, pulled: tuple[ImageStore, str], way: str
) -> None:
    """What the power-cut scenario met on btrfs: an import cut off before it named its first layer's
    stream left objects under their names whose data never reached the disk (the inode's size 0;
    with fs-verity, the descriptor kept). A kill before the stream is named, then emptying objects in
    place (unlink + an empty file under the same name), stands in for the cut. fsck names them and
    the interrupted write. `recover` (what bootc-unified-recover.service runs at boot, and every
    import first) removes exactly them; with the marker lost too, the re-run import still does not
    take them for the content their names promise (a size check) and replaces them. Oracle: the
    `fsverity digest` tool over every object afterwards."""
    require([] if shutil.which("fsverity") else ["fsverity (fsverity-utils)"], "checking object digests")
    store, ref = pulled
    repo = loopfs.path / "composefs"
    run_cli("internals", "cfs", "--repo", repo, "init", "--insecure")
    import_args = ["import", "--zerocopy", "--storage", str(store.root), ref]
    env = {"BOOTC_UNIFIED_CRASH_AT": "import-layer-before-publish:1"}
    crashed = run_cli("internals", "cfs", "--repo", repo, *import_args, check=False, env=env)
    assert crashed.returncode == -9, crashed.stderr
    assert len(list((repo / "transactions").iterdir())) == 1  # the killed import's marker
    objects = sorted(p for p in (repo / "objects").glob("??/*") if p.is_file() and p.stat().st_size > 0)
    emptied = objects[:: max(1, len(objects) // 5)][:5]
    assert len(emptied) >= 3, objects
    for path in emptied:
        path.unlink()
        path.write_bytes(b"")
    fsck = run_cli("internals", "cfs", "--repo", repo, "fsck", check=False)
    assert fsck.returncode != 0 and all(p.name in fsck.stdout for p in emptied), fsck.stdout
    assert "transactions/: a write was interrupted" in fsck.stdout
    if way == "recover":
        out = run_cli("internals", "cfs", "--repo", repo, "recover").stdout
        assert f"{len(emptied)} damaged removed" in out, out
        assert not any(p.exists() for p in emptied)
        assert run_cli("internals", "cfs", "--repo", repo, "fsck").returncode == 0
        assert run_cli("internals", "cfs", "--repo", repo, "recover").stdout.endswith("nothing to recover\n")
    else:
        shutil.rmtree(repo / "transactions")
    run_cli("internals", "cfs", "--repo", repo, *import_args)
    assert all(p.stat().st_size > 0 for p in emptied)
    assert list((repo / "transactions").iterdir()) == []
    checked, bad = fsverity_mismatches(repo)
    assert checked > 10 and bad == [], bad[:3]
    assert run_cli("internals", "cfs", "--repo", repo, "fsck").returncode == 0
