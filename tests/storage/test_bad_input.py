"""Bad input to the object store: one line naming the path, non-zero exit, nothing written."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from harness.loopfs import LoopFs
from testsupport.plugin import CLI, run_cli

pytestmark = pytest.mark.storage


@pytest.fixture
def repo(loopfs: LoopFs) -> Path:
    path = loopfs.path / "composefs"
    run_cli("internals", "cfs", "--repo", path, "init", "--insecure")
    return path


def assert_one_line_error(proc: subprocess.CompletedProcess[str], path: Path, words: str) -> None:
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("bootc-unified: error: ")
    assert str(path) in lines[0]
    assert words in lines[0], lines[0]


def assert_untouched(repo: Path) -> None:
    assert [p for p in (repo / "objects").rglob("*") if not p.is_dir()] == []
    assert run_cli("internals", "cfs", "--repo", repo, "fsck").returncode == 0


@pytest.mark.fs("xfs")
@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("symlink", "is a symlink"),
        ("chardev", "is a character device"),
        ("fifo", "is a FIFO"),
    ],
)
def test_bad_source(repo: Path, loopfs: LoopFs, kind: str, words: str) -> None:
    target = loopfs.path / "target"
    target.write_bytes(b"x" * 5000)
    bad = loopfs.path / f"bad-{kind}"
    if kind == "directory":
        bad.mkdir()
    elif kind == "symlink":
        bad.symlink_to(target)
    elif kind == "chardev":
        os.mknod(bad, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    elif kind == "fifo":
        os.mkfifo(bad)
    proc = run_cli("internals", "cfs", "--repo", repo, "add", bad, check=False)
    assert_one_line_error(proc, bad, words)
    assert_untouched(repo)


DAC = "dac_override,-dac_read_search"


@pytest.mark.fs("ext4")
def test_unreadable_source(repo: Path, loopfs: LoopFs) -> None:
    """A file the caller cannot read: root without CAP_DAC_OVERRIDE/READ_SEARCH, a real EACCES."""
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed"
    secret = loopfs.path / "secret"
    secret.write_bytes(b"y" * 5000)
    os.chmod(secret, 0o000)
    add_args = ["internals", "cfs", "--repo", str(repo), "add", str(secret)]
    proc = subprocess.run(
        [setpriv, f"--bounding-set=-{DAC}", f"--inh-caps=-{DAC}", *CLI, *add_args],
        capture_output=True,
        text=True,
    )
    assert_one_line_error(proc, secret, "Permission denied")
    assert_untouched(repo)


@pytest.mark.fs("btrfs")
def test_not_a_repository(loopfs: LoopFs) -> None:
    src = loopfs.path / "f"
    src.write_bytes(b"z")
    nowhere = loopfs.path / "nowhere"
    proc = run_cli("internals", "cfs", "--repo", nowhere, "add", src, check=False)
    assert_one_line_error(proc, nowhere, "no such repository")
    empty = loopfs.path / "empty"
    empty.mkdir()
    proc = run_cli("internals", "cfs", "--repo", empty, "fsck", check=False)
    assert_one_line_error(proc, empty, "not a composefs repository")
    (empty / "meta.json").write_text("{not json")
    proc = run_cli("internals", "cfs", "--repo", empty, "fsck", check=False)
    assert_one_line_error(proc, empty / "meta.json", "not a valid repository meta.json")


def test_init_refuses_existing_and_non_verity(loopfs: LoopFs) -> None:
    repo = loopfs.path / "composefs"
    run_cli("internals", "cfs", "--repo", repo, "init", "--insecure")
    proc = run_cli("internals", "cfs", "--repo", repo, "init", "--insecure", check=False)
    assert_one_line_error(proc, repo, "already a composefs repository")

    # Without --insecure, init needs fs-verity; the oracle is `fsverity enable` on the same filesystem.
    sample = loopfs.path / "sample"
    sample.write_bytes(b"sample")
    kernel_ok = subprocess.run(["fsverity", "enable", str(sample)], capture_output=True).returncode == 0
    secure = loopfs.path / "secure"
    proc = run_cli("internals", "cfs", "--repo", secure, "init", check=False)
    if kernel_ok:
        assert proc.returncode == 0, proc.stderr
    else:
        assert_one_line_error(proc, secure, "--insecure")
        assert not secure.exists()
        assert sorted(p.name for p in loopfs.path.iterdir() if p.name.startswith(".")) == []
