"""composefs EROFS images read by the kernel: erofs + overlayfs (data-only lower), compared with the source.

The source tree is built on a loop filesystem, its large files stored as objects of a real
(insecure: the host has no fs-verity) repository, the image written by our writer, checked by
fsck.erofs and mounted; then every path's type, mode, owner, size, content, symlink target,
rdev, xattrs, mtime and hardlink identity must match the source.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bootc_unified.erofs import Directory, Regular, from_directory, write_image
from bootc_unified.erofs.mount import mounted
from bootc_unified.erofs.reader import read_image
from bootc_unified.repository import Repository
from bootc_unified.verity import HashAlg
from harness.erofs_samples import compare_trees, make_sample_tree
from harness.loopfs import LoopFs
from harness.pytest_plugin import require

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


@pytest.mark.fs("ext4", "xfs")
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
