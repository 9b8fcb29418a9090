"""composefs EROFS images read by the kernel: erofs + overlayfs (data-only lower), compared with the source.

The source tree is built on a loop filesystem, its large files stored as objects of a real
(insecure: the host has no fs-verity) repository, the image written by our writer, checked by
fsck.erofs and mounted; then every path's type, mode, owner, size, content, symlink target,
rdev, xattrs, mtime and hardlink identity must match the source.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from bootc_unified.erofs import Device, Directory, Regular, from_directory, write_image
from bootc_unified.erofs.mount import mounted
from bootc_unified.erofs.reader import read_image
from bootc_unified.erofs.tree import InodeMeta
from bootc_unified.repository import Repository
from bootc_unified.verity import HashAlg, digest_bytes
from harness.loopfs import LoopFs
from harness.pytest_plugin import require
from testsupport.erofs_samples import compare_trees, make_sample_tree

pytestmark = pytest.mark.storage


def mount_prerequisites() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("root")
    for fs in ("erofs", "overlay"):
        if fs not in Path("/proc/filesystems").read_text() and not Path(f"/sys/module/{fs}").exists():
            problems.append(f"kernel {fs} support")
    return problems


def build(src: Path, repo_dir: Path, alg: HashAlg) -> tuple[Repository, Directory, Path]:
    repo = Repository.init(repo_dir, alg=alg, insecure=True)
    tree = from_directory(src, lambda p: repo.ensure_object(p.read_bytes()).object_id)
    image = repo_dir.parent / f"{repo_dir.name}.cfs"
    image.write_bytes(write_image(tree, alg))
    return repo, tree, image


@pytest.mark.fs("ext4")  # XFS caps symlink targets at 1024 bytes; the sample has longer ones
@pytest.mark.parametrize("alg", [HashAlg.SHA256, HashAlg.SHA512], ids=lambda a: a.label)
def test_mounted_image_matches_source(loopfs: LoopFs, alg: HashAlg, tmp_path: Path) -> None:
    require(mount_prerequisites(), "mounting composefs images")
    src = loopfs.path / "src"
    make_sample_tree(src)
    repo, tree, image = build(src, loopfs.path / "repo", alg)
    subprocess.run(["fsck.erofs", str(image)], check=True, capture_output=True)
    assert read_image(image.read_bytes()) == tree
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(image, repo.path / "objects", mnt):
        problems = compare_trees(src, mnt)
    assert problems == [], "\n".join(problems[:50])


def acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL xattr value: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_kernel_reads_edge_cases(tmp_path: Path) -> None:
    """What no disk tree here can hold: 64 KiB xattr values, 300 xattrs on one inode, 2^32-1 ids,
    mtimes before 1970 and far after 2038, a 16 TiB file, high device numbers, ACLs."""
    require(mount_prerequisites(), "mounting composefs images")
    alg = HashAlg.SHA256
    content = b"external object content " * 100
    oid = digest_bytes(content, alg).hex()
    objects = tmp_path / "objects"
    (objects / oid[:2]).mkdir(parents=True)
    (objects / oid[:2] / oid[2:]).write_bytes(content)

    def meta(mode: int, **kw: int) -> InodeMeta:
        return {"mode": mode, "uid": 0, "gid": 0, "mtime": 1_700_000_000, "mtime_nsec": 0, "xattrs": {}, **kw}  # type: ignore[typeddict-item]

    many = {f"user.attr-{i:04d}".encode(): bytes([i % 256]) * 100 for i in range(300)}
    access = acl(
        (1, 6, 0xFFFFFFFF), (2, 4, 1234), (4, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)
    )
    tree = Directory(
        entries={
            b"max-value": Regular(
                size=1, data=b"v", **{**meta(stat.S_IFREG | 0o600), "xattrs": {b"user.v": b"v" * 65535}}
            ),
            b"many": Regular(
                size=len(content), object_id=oid, **{**meta(stat.S_IFREG | 0o644), "xattrs": many}
            ),
            b"acl": Regular(
                size=0,
                data=b"",
                **{**meta(stat.S_IFREG | 0o640), "xattrs": {b"system.posix_acl_access": access}},
            ),
            b"ids": Regular(size=0, data=b"", **meta(stat.S_IFREG | 0o644, uid=2**32 - 2, gid=2**32 - 3)),
            b"old": Regular(size=0, data=b"", **meta(stat.S_IFREG | 0o644, mtime=-86400, mtime_nsec=5)),
            b"future": Regular(
                size=0, data=b"", **meta(stat.S_IFREG | 0o644, mtime=2**34, mtime_nsec=999_999_999)
            ),
            b"huge": Regular(size=2**44 + 1, object_id=oid, **meta(stat.S_IFREG | 0o644)),
            b"dev": Device(rdev=os.makedev(4095, 0xFFFFF), **meta(stat.S_IFBLK | 0o600)),
        },
        **meta(stat.S_IFDIR | 0o755),
    )
    image = tmp_path / "edge.cfs"
    image.write_bytes(write_image(tree, alg))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(image, objects, mnt):
        assert os.getxattr(mnt / "max-value", "user.v") == b"v" * 65535
        assert {n: os.getxattr(mnt / "many", n) for n in os.listxattr(mnt / "many")} == {
            n.decode(): v for n, v in many.items()
        }
        assert (mnt / "many").read_bytes() == content
        assert os.getxattr(mnt / "acl", "system.posix_acl_access") == access
        st = os.stat(mnt / "ids")
        assert (st.st_uid, st.st_gid) == (2**32 - 2, 2**32 - 3)
        assert os.stat(mnt / "old").st_mtime_ns == -86400 * 10**9 + 5
        assert os.stat(mnt / "future").st_mtime_ns == 2**34 * 10**9 + 999_999_999
        assert os.stat(mnt / "huge").st_size == 2**44 + 1
        rdev = os.stat(mnt / "dev").st_rdev
        assert (os.major(rdev), os.minor(rdev)) == (4095, 0xFFFFF)
    assert not os.path.ismount(mnt)


def test_mount_is_undone_on_error(tmp_path: Path) -> None:
    require(mount_prerequisites(), "mounting composefs images")
    root = Directory(mode=stat.S_IFDIR | 0o755, entries={b"f": Regular(mode=stat.S_IFREG, size=1, data=b"x")})
    image = tmp_path / "img.cfs"
    image.write_bytes(write_image(root, HashAlg.SHA512))
    (tmp_path / "objects").mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pytest.raises(RuntimeError, match="boom"), mounted(image, tmp_path / "objects", mnt):
        assert (mnt / "f").read_bytes() == b"x"
        raise RuntimeError("boom")
    assert not os.path.ismount(mnt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.cfs", "mnt", "objects"]  # lower dir removed
    with (
        pytest.raises(ValueError, match="verity must be one of"),
        mounted(image, tmp_path / "objects", mnt, "yes"),
    ):
        pass
