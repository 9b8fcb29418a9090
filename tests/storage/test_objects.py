"""The object store on real loop filesystems: reflink, hardlink and copy, proven by the kernel.

Oracles: FIEMAP_EXTENT_SHARED and physical extent addresses (btrfs, XFS), inode identity and
st_nlink (ext4), `fsverity digest` for object IDs, byte comparison for copies.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from harness.checks import all_extents_shared, fiemap, nlink, physical_ranges, same_inode
from harness.loopfs import LoopFs
from testsupport.plugin import LoopFsFactory, run_cli

pytestmark = pytest.mark.storage


def fsverity_digest(path: Path, alg: str = "sha512") -> str:
    out = subprocess.run(
        ["fsverity", "digest", f"--hash-alg={alg}", str(path)], check=True, capture_output=True, text=True
    ).stdout
    return out.split()[0].split(":", 1)[1]


def object_path(repo: Path, object_id: str) -> Path:
    return repo / "objects" / object_id[:2] / object_id[2:]


def object_files(repo: Path) -> list[Path]:
    return sorted(p for p in (repo / "objects").rglob("*") if p.is_file())


def make_source(fs: LoopFs, size: int = 3 * 1024 * 1024 + 17) -> Path:
    src = fs.path / "store" / "diff" / "usr" / "lib" / "blob"
    src.parent.mkdir(parents=True)
    with open(src, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    return src


def init_repo(path: Path, *extra: str) -> Path:
    run_cli("internals", "cfs", "--repo", path, "init", "--insecure", *extra)
    return path


def add(repo: Path, *files: Path, zerocopy: bool = False, check: bool = True) -> list[dict[str, object]]:
    args = ["internals", "cfs", "--repo", str(repo), "add", *(["--zerocopy"] if zerocopy else []), *files]
    proc = run_cli(*args, check=check)
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.fs("btrfs", "xfs")
def test_reflink_shares_every_extent(loopfs: LoopFs) -> None:
    src = make_source(loopfs)
    repo = init_repo(loopfs.path / "composefs")
    [out] = add(repo, src, zerocopy=True)
    assert out["method"] == "reflinked"
    assert out["bytes"] == src.stat().st_size
    assert out["object_id"] == fsverity_digest(src)
    obj = object_path(repo, str(out["object_id"]))
    assert not same_inode(obj, src), "a reflink is its own inode"
    assert nlink(src) == 1
    assert obj.read_bytes() == src.read_bytes()
    assert all_extents_shared(obj) and all_extents_shared(src)
    assert physical_ranges(obj) == physical_ranges(src), "the object's data sits in the source's blocks"


@pytest.mark.fs("ext4")
def test_ext4_insecure_hardlinks_the_source(loopfs: LoopFs) -> None:
    src = make_source(loopfs)
    repo = init_repo(loopfs.path / "composefs")
    [out] = add(repo, src, zerocopy=True)
    assert out["method"] == "hardlinked"
    obj = object_path(repo, str(out["object_id"]))
    assert same_inode(obj, src)
    assert nlink(src) == 2
    assert out["object_id"] == fsverity_digest(src)


def test_second_add_is_already_present(loopfs: LoopFs) -> None:
    src = make_source(loopfs, 70_000)
    repo = init_repo(loopfs.path / "composefs")
    first, second = add(repo, src, src)
    assert first["object_id"] == second["object_id"]
    assert second["method"] == "already-present"
    assert len(object_files(repo)) == 1


def test_sha256_repository(loopfs: LoopFs) -> None:
    src = make_source(loopfs, 5000)
    repo = init_repo(loopfs.path / "composefs", "--hash", "sha256")
    [out] = add(repo, src)
    assert out["object_id"] == fsverity_digest(src, "sha256")
    assert json.loads((repo / "meta.json").read_text())["algorithm"] == "fsverity-sha256-12"


def test_across_filesystems_copies_and_zerocopy_refuses(fs_kind: str, loopfs_factory: LoopFsFactory) -> None:
    other = loopfs_factory("xfs" if fs_kind != "xfs" else "btrfs")
    repo_fs = loopfs_factory(fs_kind)
    src = make_source(other)
    repo = init_repo(repo_fs.path / "composefs")

    failed = add(repo, src, zerocopy=True, check=False)
    assert failed == []
    proc = run_cli("internals", "cfs", "--repo", repo, "add", "--zerocopy", src, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and str(src) in proc.stderr and "another filesystem" in proc.stderr
    assert object_files(repo) == [], "a refused zero-copy add leaves nothing behind"
    assert run_cli("internals", "cfs", "--repo", repo, "fsck").returncode == 0

    [out] = add(repo, src)
    assert out["method"] == "copied"
    obj = object_path(repo, str(out["object_id"]))
    assert obj.read_bytes() == src.read_bytes()
    assert not any(e.shared for e in fiemap(obj))
    assert nlink(src) == 1


def test_ensure_object_bytes_and_fsck_clean(loopfs: LoopFs) -> None:
    from bootc_unified.repository import Method, Repository

    repo = Repository.open(init_repo(loopfs.path / "composefs"))
    data = os.urandom(9000)
    result = repo.ensure_object(data)
    assert result.method is Method.COPIED
    (loopfs.path / "plain").write_bytes(data)
    assert result.object_id == fsverity_digest(loopfs.path / "plain")
    assert repo.ensure_object(data).method is Method.PRESENT
    assert repo.fsck().ok


def test_fsck_names_a_corrupted_object(loopfs: LoopFs) -> None:
    src = make_source(loopfs, 100_000)
    other = loopfs.path / "other"
    other.write_bytes(os.urandom(5000))
    repo = init_repo(loopfs.path / "composefs")
    outs = add(repo, src, other)
    bad = object_path(repo, str(outs[0]["object_id"]))
    with open(bad, "r+b") as f:  # flip bytes in place
        f.seek(50_000)
        byte = f.read(1)
        f.seek(50_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc = run_cli("internals", "cfs", "--repo", repo, "fsck", check=False)
    assert proc.returncode == 1
    rel = bad.relative_to(repo)
    assert proc.stdout.splitlines() == [
        f"corrupt object {rel}: content digest is {fsverity_digest(bad)}",
    ]


def test_kill_between_write_and_link_leaves_nothing(loopfs: LoopFs) -> None:
    src = make_source(loopfs, 200_000)
    repo = init_repo(loopfs.path / "composefs")
    env = {"BOOTC_UNIFIED_CRASH_AT": "object-before-link"}
    proc = run_cli("internals", "cfs", "--repo", repo, "add", src, check=False, env=env)
    assert proc.returncode == -9, proc.stderr  # SIGKILL
    assert object_files(repo) == []
    fsck = run_cli("internals", "cfs", "--repo", repo, "fsck", check=False)
    assert fsck.returncode == 0 and fsck.stdout == ""
    [out] = add(repo, src)
    assert out["object_id"] == fsverity_digest(src)
    assert len(object_files(repo)) == 1
    assert run_cli("internals", "cfs", "--repo", repo, "fsck").returncode == 0


def test_reflink_probe_does_not_outlive_a_mount(tmp_path: Path) -> None:
    """Loop device numbers are reused after unmount: an ext4 'no reflink' answer must not stick to
    the XFS filesystem that gets the same device number next (seen in the demo)."""
    from bootc_unified.repository import Method, Repository

    for kind, expected in [("ext4", Method.HARDLINKED), ("xfs", Method.REFLINKED)]:
        with LoopFs.create(kind, tmp_path, name=kind) as fs:
            src = make_source(fs, 20_000)
            repo = Repository.init(fs.path / "composefs", insecure=True)
            assert repo.ensure_object_from_file(src).method is expected


@pytest.mark.fs("ext4")
def test_objects_dir_is_private(loopfs: LoopFs) -> None:
    """A hardlinked setuid source stays setuid as an object: objects/ must not be reachable by others."""
    src = make_source(loopfs, 5000)
    os.chmod(src, 0o4755)
    repo = init_repo(loopfs.path / "composefs")
    [out] = add(repo, src)
    assert os.stat(object_path(repo, str(out["object_id"]))).st_mode & 0o4000
    assert stat.S_IMODE(os.stat(repo / "objects").st_mode) == 0o700


@pytest.mark.fs("btrfs", "xfs")
def test_listed_store_knows_what_exists(loopfs: LoopFs) -> None:
    """Within ObjectStore.listed() (an import of a large layer), whether an object exists comes from
    one listing, where the layer adds enough objects to pay for it: objects from before it, objects
    added within it and a leftover a power cut emptied must each be told apart, listed or not.
    Oracles: `fsverity digest` of the sources, the bytes in objects/."""
    from bootc_unified.repository import Method, Repository

    repo = Repository.init(loopfs.path / "composefs", insecure=True)
    for round_, (adding, listing) in enumerate([(4, True), (4, False)]):
        if not listing:  # a repository with 300 objects more than a layer of 4 should list
            for i in range(300):
                repo.objects.ensure_object(b"%d" % i * 100)
        before, new, emptied = (loopfs.path / f"{name}-{round_}" for name in ("before", "new", "emptied"))
        for src in (before, new, emptied):
            src.write_bytes(os.urandom(70_000))
        assert repo.objects.ensure_object_from_file(before, zerocopy_only=True).method is Method.REFLINKED
        leftover = object_path(repo.path, fsverity_digest(emptied))
        leftover.parent.mkdir(exist_ok=True)
        leftover.write_bytes(b"")  # named, its data lost
        with repo.objects.listed(adding):
            assert (repo.objects._known is not None) is listing  # the decision (white box)
            methods = [
                repo.objects.ensure_object_from_file(p, zerocopy_only=True).method
                for p in (before, new, new, emptied)
            ]
        assert methods == [Method.PRESENT, Method.REFLINKED, Method.PRESENT, Method.REFLINKED]
        for src in (before, new, emptied):
            assert object_path(repo.path, fsverity_digest(src)).read_bytes() == src.read_bytes()
