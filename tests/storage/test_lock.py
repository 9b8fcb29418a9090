"""Repository locking: writers share the lock, GC's exclusive lock holds them off."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bootc_unified.repository import Repository
from harness.loopfs import LoopFs
from testsupport.plugin import CLI, run_cli
from testsupport.proclocks import wait_until_blocked

pytestmark = pytest.mark.storage


@pytest.mark.fs("xfs")
def test_exclusive_lock_blocks_writers_and_shared_does_not(loopfs: LoopFs) -> None:
    repo_path = loopfs.path / "composefs"
    run_cli("internals", "cfs", "--repo", repo_path, "init", "--insecure")
    src = loopfs.path / "f"
    src.write_bytes(b"lock" * 5000)
    repo = Repository.open(repo_path)
    add = [*CLI, "internals", "cfs", "--repo", str(repo_path), "add", str(src)]

    with repo.writer_lock():  # another writer: add goes ahead
        assert subprocess.run(add, capture_output=True, timeout=60).returncode == 0

    other = loopfs.path / "g"
    other.write_bytes(b"gc" * 5000)
    add[-1] = str(other)
    with repo.gc_lock():
        proc = subprocess.Popen(add, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # the kernel's lock table shows add waiting for the repository's lock (its directory)
        waiting = wait_until_blocked(proc, [repo_path], timeout=60)
        assert waiting.kind == "FLOCK" and waiting.mode == "READ", waiting
        assert proc.poll() is None, "add must wait while GC holds the repository"
        assert objects(repo_path) == 1
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert objects(repo_path) == 2


def objects(repo: Path) -> int:
    return sum(1 for p in (repo / "objects").rglob("*") if p.is_file())
