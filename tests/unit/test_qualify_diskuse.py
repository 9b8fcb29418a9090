"""harness.diskuse, the qualification's disk figures (what the guest measures for the report).

Oracles: `du` where it is right (hardlinks in one invocation count once), the filesystem's own
used-block count (statfs, as `df`) where du is wrong (a reflinked copy takes no new data blocks),
and the bytes the test wrote.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harness import diskuse
from harness.loopfs import LoopFs
from testsupport.plugin import LoopFsFactory

MIB = 1 << 20


def du(*paths: Path, count_links: bool = False) -> int:
    argv = ["du", "-s", "-c", "-B1", "-x", *(["-l"] if count_links else []), *map(str, paths)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return int(out.splitlines()[-1].split()[0])


def write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))


def used(fs: Path) -> int:
    os.sync()
    st = os.statvfs(fs)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_union_length() -> None:
    assert diskuse.union_length([]) == 0
    assert diskuse.union_length([(0, 10), (5, 15), (20, 30), (20, 30), (22, 25)]) == 25
    assert diskuse.union_length([(10, 20), (0, 10)]) == 20


def test_hardlinks_count_once_as_du_says(tmp_path: Path) -> None:
    store, repo = tmp_path / "store", tmp_path / "repo"
    for i in range(4):
        write(store / "diff" / f"f{i}", MIB + i * 4096)
    write(repo / "objects" / "own", MIB // 2)
    for i in range(3):  # the repository shares three of the store's files
        os.link(store / "diff" / f"f{i}", repo / "objects" / f"shared{i}")
    got = diskuse.figures(str(store), str(repo))
    assert got["bootc_store_bytes"] == du(store)
    assert got["repository_extra_bytes"] == du(store, repo) - du(store)
    assert got["plain_copy_bytes"] == du(repo, count_links=True)
    assert got["repository_files"] == 4
    # the oracle's own sanity: sharing three files made the repository's extra its own file + dirs
    assert MIB // 2 <= got["repository_extra_bytes"] < MIB // 2 + 64 * 1024
    assert got["plain_copy_bytes"] > 3 * MIB + MIB // 2


@pytest.mark.storage
@pytest.mark.parametrize("kind", ["xfs", "btrfs"])
def test_reflinks_count_once_as_the_filesystem_says(kind: str, loopfs_factory: LoopFsFactory) -> None:
    fs: LoopFs = loopfs_factory(kind)
    store, repo = fs.path / "store", fs.path / "repo"
    for i in range(3):
        write(store / "diff" / f"f{i}", 2 * MIB)
    (repo / "objects").mkdir(parents=True)
    before = used(fs.path)
    for i in range(3):
        subprocess.run(
            ["cp", "--reflink=always", str(store / "diff" / f"f{i}"), str(repo / "objects" / f"o{i}")],
            check=True,
        )
    grown = used(fs.path) - before
    got = diskuse.figures(str(store), str(repo))
    # the filesystem allocated (next to) nothing for the copies, and so says the repository's extra
    assert grown < 256 * 1024, grown
    assert got["repository_extra_bytes"] < 256 * 1024, got
    # du counts a reflinked file's data again; a plain copy would take it again
    assert du(store, repo) - du(store) >= 6 * MIB
    assert got["plain_copy_bytes"] >= 6 * MIB
    assert got["bootc_store_bytes"] >= 6 * MIB
