"""Where the store and the repository live (issue 12, R3 layout): the store's `overlay/` bind-mounted
onto itself, and the repository on another filesystem than the store.

containers/storage bind-mounts `<root>/overlay` onto itself (private) whenever podman or skopeo runs
against a store without `overlay.skip_mount_home`. The store's files are then reached through
another mount of the same filesystem, and linkat(2) refuses to link across mounts (EXDEV) even
within one filesystem: the zero-copy import died there on ext4 (hardlinks), bootc #2324's class of
failure. The import now reaches the same inode through the repository's own mount (file handle,
open_by_handle_at) and stays zero-copy. Oracles: inode numbers and st_nlink (ext4, hardlinks), FIEMAP
shared extents (btrfs, XFS, reflinks), podman's own mount of the image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.checks import all_extents_shared
from harness.loopfs import LoopFs
from testsupport.cstore_fixtures import (
    BuiltImage,
    StoreDirs,
    copy_into_store,
    make_store_dirs,
    release_store,
    write_oci_layout,
)
from testsupport.hostile import BASE, assert_as_podman, assert_refused, directory, import_cli, init_repo, tar
from testsupport.plugin import LoopFsFactory
from testsupport.tarlayer import entry

pytestmark = pytest.mark.storage

# Files over 64 bytes become objects shared with the store; one large enough for several extents.
LAYER = tar(
    directory("usr"),
    entry("usr/small", b"s" * 65),
    entry("usr/page", os.urandom(4096)),
    entry("usr/big", os.urandom(3 << 20)),
)
IMAGE = BuiltImage("app", (BASE, LAYER))
REF = "localhost/app:latest"


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("layout") / "oci"
    write_oci_layout(path, [IMAGE])
    return path


def bind_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def store_files(store: StoreDirs) -> dict[str, Path]:
    """The diff/ file of every regular file over 64 bytes in the image, by name."""
    out = {}
    for path in store.root.glob("overlay/*/diff/**/*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size > 64:
            out[path.name] = path
    return out


def object_of(repo: Path, source: Path) -> Path:
    """The repository object with the same content as `source` (found by content, not by our IDs)."""
    data = source.read_bytes()
    matches = [
        p for p in (repo / "objects").glob("??/*") if p.stat().st_size == len(data) and p.read_bytes() == data
    ]
    assert len(matches) == 1, f"{source}: {len(matches)} objects with its content"
    return matches[0]


@pytest.fixture
def store(loopfs: LoopFs, layout: Path) -> Iterator[StoreDirs]:
    """A store whose storage.conf has no skip_mount_home: skopeo leaves `overlay/` bind-mounted."""
    s = make_store_dirs(loopfs.path / "store")
    copy_into_store(layout, "app", s, REF)
    yield s
    release_store(s)


def test_bind_mounted_overlay_import_stays_zero_copy(
    loopfs: LoopFs, store: StoreDirs, fs_kind: str, tmp_path: Path
) -> None:
    """Real containers/storage behaviour, not a simulation: skopeo made the bind mount. Zero-copy mode
    succeeds, prints only its JSON, and every object shares its data with the store's file."""
    assert bind_mounted(store.root / "overlay"), "containers/storage did not bind-mount overlay/"
    repo = init_repo(loopfs.path / "composefs")
    out = assert_as_podman(store, repo, REF, IMAGE.diff_ids, tmp_path / "mnt", zerocopy=True)
    objects = out["objects"]
    assert isinstance(objects, dict)
    assert objects["copied"] == {"objects": 0, "bytes": 0}
    files = store_files(store)
    assert {"small", "page", "big", "target", "file"} <= set(files)
    for name, source in files.items():
        obj = object_of(repo, source)
        if fs_kind == "ext4":  # no reflink: a hardlink, the same inode
            assert os.stat(obj).st_ino == os.stat(source).st_ino, name
            assert os.stat(source).st_nlink == 2, name
        else:  # a reflink: another inode on the same extents (btrfs keeps files under 4 KiB inline)
            assert os.stat(obj).st_ino != os.stat(source).st_ino, name
            if fs_kind == "xfs" or source.stat().st_size >= 4096:
                assert all_extents_shared(obj) and all_extents_shared(source), name


@pytest.mark.fs("ext4")
def test_bind_mount_made_by_hand_import_stays_zero_copy(loopfs: LoopFs, layout: Path, tmp_path: Path) -> None:
    """The store made with skip_mount_home (no bind mount), then `mount --bind overlay overlay`."""
    from harness.run import run

    s = make_store_dirs(loopfs.path / "store")
    dest = f"containers-storage:[overlay@{s.root}+{s.runroot}:overlay.skip_mount_home=true]{REF}"
    try:
        run(["skopeo", "copy", "--quiet", f"oci:{layout}:app", dest], env=s.env, timeout=600)
        overlay = s.root / "overlay"
        assert not bind_mounted(overlay)
        run(["mount", "--bind", overlay, overlay])
        assert bind_mounted(overlay)
        repo = init_repo(loopfs.path / "composefs")
        out = assert_as_podman(s, repo, REF, IMAGE.diff_ids, tmp_path / "mnt", zerocopy=True)
        objects = out["objects"]
        assert isinstance(objects, dict)
        assert objects["hardlinked"]["objects"] == 5 and objects["copied"]["objects"] == 0
        big = store_files(s)["big"]
        assert os.stat(object_of(repo, big)).st_ino == os.stat(big).st_ino
    finally:
        release_store(s)


@pytest.fixture
def split(fs_kind: str, loopfs_factory: LoopFsFactory, layout: Path) -> Iterator[tuple[StoreDirs, Path]]:
    """A store on one filesystem, an empty repository on another of the same kind."""
    store_fs, repo_fs = loopfs_factory(fs_kind), loopfs_factory(fs_kind)
    s = make_store_dirs(store_fs.path / "store")
    copy_into_store(layout, "app", s, REF)
    yield s, init_repo(repo_fs.path / "composefs")
    release_store(s)


def test_other_filesystem_zero_copy_is_one_line(split: tuple[StoreDirs, Path]) -> None:
    """Zero-copy cannot cross filesystems: one line naming the diff file and why, nothing published."""
    store, repo = split
    proc = import_cli(repo, store.root, REF, zerocopy=True)
    assert_refused(proc, repo, str(store.root / "overlay"), "/diff/", "another filesystem")


def test_other_filesystem_copies_are_counted(split: tuple[StoreDirs, Path], tmp_path: Path) -> None:
    """Without --zerocopy the data is copied, and the JSON counts exactly the files and bytes copied;
    the objects are new inodes sharing no extent with the store."""
    store, repo = split
    out = assert_as_podman(store, repo, REF, IMAGE.diff_ids, tmp_path / "mnt")
    files = store_files(store)
    objects = out["objects"]
    assert isinstance(objects, dict)
    assert objects["copied"] == {
        "objects": len(files),
        "bytes": sum(p.stat().st_size for p in files.values()),
    }
    assert objects["reflinked"]["objects"] == objects["hardlinked"]["objects"] == 0
    for source in files.values():
        obj = object_of(repo, source)
        assert os.stat(obj).st_dev != os.stat(source).st_dev
        assert os.stat(source).st_nlink == 1
    assert json.loads(json.dumps(out))["layers"] == {"imported": 2, "present": 0}
