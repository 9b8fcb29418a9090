"""Bad layers through the whole path: registry-free OCI layouts copied into a real containers-storage
by skopeo (containers/storage unpacks them), then imported. What containers/storage refuses at pull
never reaches the import; what it accepts, we import as podman shows it or refuse with one line
naming the layer and the entry, and the repository gains no ref and still passes fsck."""

from __future__ import annotations

import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootc_unified.erofs.mount import mounted
from harness.loopfs import LoopFs
from harness.run import CommandError
from harness.treecompare import differences, snapshot_dir
from testsupport.cstore_fixtures import BuiltImage, StoreDirs, copy_into_store, make_store_dirs, release_store
from testsupport.plugin import run_cli
from testsupport.tarlayer import entry, make_tar

pytestmark = [pytest.mark.storage, pytest.mark.fs("xfs")]


BASE = make_tar(
    entry("etc", b"", type=tarfile.DIRTYPE, mode=0o755), entry("etc/os-release"), entry("target", b"t" * 100)
)

REFUSED_BY_PODMAN = {
    "hardlink-missing": make_tar(entry("hl", type=tarfile.LNKTYPE, linkname="nothere")),
    "hardlink-later": make_tar(entry("hl", type=tarfile.LNKTYPE, linkname="later"), entry("later")),
    "duplicate": make_tar(entry("dup", b"1" * 100), entry("dup", b"2" * 200)),
    "through-symlink": make_tar(entry("lnk", type=tarfile.SYMTYPE, linkname="/etc"), entry("lnk/passwd")),
}
REFUSED_BY_US = {
    "dotdot": (make_tar(entry("../x")), "../x"),
    "dotdot-inside": (make_tar(entry("a/../../b")), "a/../../b"),
    "xattr-too-big": (make_tar(entry("big", pax_headers={"SCHILY.xattr.user.big": "v" * 65536})), "big"),
}
AS_PODMAN = {
    "absolute": make_tar(entry("/abs")),
    "symlink-loop": make_tar(
        entry("s1", type=tarfile.SYMTYPE, linkname="s2"), entry("s2", type=tarfile.SYMTYPE, linkname="s1")
    ),
}


@pytest.fixture
def store(loopfs: LoopFs) -> Iterator[StoreDirs]:
    s = make_store_dirs(loopfs.path / "store")
    yield s
    release_store(s)


@pytest.fixture
def layout(loopfs: LoopFs) -> Path:
    from testsupport.cstore_fixtures import write_oci_layout

    path = loopfs.path / "layout"
    images = [BuiltImage(name, (BASE, t)) for name, t in REFUSED_BY_PODMAN.items()]
    images += [BuiltImage(name, (BASE, t)) for name, (t, _) in REFUSED_BY_US.items()]
    images += [BuiltImage(name, (BASE, t)) for name, t in AS_PODMAN.items()]
    write_oci_layout(path, images)
    return path


@pytest.fixture
def repo(loopfs: LoopFs) -> Path:
    path = loopfs.path / "composefs"
    run_cli("internals", "cfs", "--repo", path, "init", "--insecure")
    return path


def refs(repo: Path) -> list[Path]:
    return [p for p in (repo / "streams" / "refs").rglob("*") if p.is_symlink()]


@pytest.mark.parametrize("name", sorted(REFUSED_BY_PODMAN))
def test_containers_storage_refuses_at_pull(layout: Path, store: StoreDirs, name: str) -> None:
    with pytest.raises(CommandError):
        copy_into_store(layout, name, store, f"localhost/{name}:latest")


@pytest.mark.parametrize("name", sorted(REFUSED_BY_US))
def test_import_refuses_with_one_line(layout: Path, store: StoreDirs, repo: Path, name: str) -> None:
    copy_into_store(layout, name, store, f"localhost/{name}:latest")
    proc = run_cli(
        "internals",
        "cfs",
        "--repo",
        repo,
        "import",
        "--storage",
        store.root,
        f"localhost/{name}:latest",
        check=False,
    )
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    entry = REFUSED_BY_US[name][1]
    assert lines[0].startswith("bootc-unified: error: layer sha256:")
    assert f"({entry})" in lines[0] or f"entry {entry!r}" in lines[0]
    assert refs(repo) == []
    assert run_cli("internals", "cfs", "--repo", repo, "fsck").returncode == 0


@pytest.mark.parametrize("name", sorted(AS_PODMAN))
def test_import_as_podman_shows_it(
    layout: Path, store: StoreDirs, repo: Path, name: str, tmp_path: Path
) -> None:
    ref = f"localhost/{name}:latest"
    copy_into_store(layout, name, store, ref)
    out = json.loads(
        run_cli("internals", "cfs", "--repo", repo, "import", "--storage", store.root, ref).stdout
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    image = repo / "objects" / out["image_id"][:2] / out["image_id"][2:]
    with mounted(image, repo / "objects", mnt):
        ours = snapshot_dir(mnt)
    podman_mnt = Path(
        subprocess.run(
            store.podman("image", "mount", ref), env=store.env, check=True, capture_output=True, text=True
        ).stdout.strip()
    )
    try:
        theirs = snapshot_dir(podman_mnt)
    finally:
        subprocess.run(store.podman("image", "unmount", ref), env=store.env, capture_output=True)
    ours.records[b"/"] = theirs.records[b"/"]
    assert differences(theirs, ours) == []


def test_corrupted_diff_file_is_refused(layout: Path, store: StoreDirs, repo: Path) -> None:
    """A diff/ file whose bytes no longer match the tar-split (and so the DiffID)."""
    ref = "localhost/absolute:latest"
    copy_into_store(layout, "absolute", store, ref)
    victims = list(store.root.glob("overlay/*/diff/abs"))
    assert len(victims) == 1
    data = bytearray(victims[0].read_bytes())
    data[10] ^= 0xFF
    victims[0].write_bytes(bytes(data))
    proc = run_cli("internals", "cfs", "--repo", repo, "import", "--storage", store.root, ref, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "(/abs)" in proc.stderr and "CRC-64" in proc.stderr
    assert refs(repo) == []
    assert run_cli("internals", "cfs", "--repo", repo, "fsck").returncode == 0
