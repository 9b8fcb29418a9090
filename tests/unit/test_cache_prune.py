"""The build cache's prune (harness.cache.prune): old keys go, the newest two of each group and
anything built recently stay. Oracle: the directory listing after the call."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import cache

HOUR = 3600.0


def entry(directory: Path, name: str, age_hours: float) -> Path:
    path = directory / name
    path.write_bytes(b"x")
    stamp = time.time() - age_hours * HOUR
    os.utime(path, (stamp, stamp))
    return path


def test_prune_keeps_newest_and_recent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOTC_UNIFIED_CACHE", str(tmp_path))
    installed = tmp_path / "installed"
    installed.mkdir()
    ages = {"0" * 16: 10.0, "1" * 16: 9.0, "2" * 16: 2.5, "3" * 16: 2.0, "4" * 16: 1.0}
    for key, age in ages.items():
        entry(installed, f"ext4-unified-{key}.qcow2", age)
    entry(installed, f"xfs-unified-{'5' * 16}.qcow2", 20.0)  # alone in its group: newest
    entry(installed, "notes.txt", 30.0)  # not a keyed entry: never touched
    removed = cache.prune()
    assert sorted(p.name for p in removed) == [
        f"ext4-unified-{'0' * 16}.qcow2",
        f"ext4-unified-{'1' * 16}.qcow2",
    ]
    left = sorted(p.name for p in installed.iterdir())
    assert left == [
        f"ext4-unified-{'2' * 16}.qcow2",  # not among the two newest, but built within 3 h
        f"ext4-unified-{'3' * 16}.qcow2",
        f"ext4-unified-{'4' * 16}.qcow2",
        "notes.txt",
        f"xfs-unified-{'5' * 16}.qcow2",
    ]


def test_concurrent_prunes_delete_each_entry_once(tmp_path: Path) -> None:
    """Parallel pytest runs each prune at start: none may fail on an entry another one removed.
    Oracle: the prunes' own exit status and what each printed, against the listing afterwards."""
    installed = tmp_path / "installed"
    installed.mkdir()
    stale = {f"g{g}-unified-{k:016x}.qcow2" for g in range(1000) for k in range(4)}
    for i, name in enumerate(sorted(stale)):
        entry(installed, name, 10.0 + i % 4)  # per group: 10, 11, 12, 13 h old
    script = "from harness import cache\nfor p in cache.prune():\n    print(p.name)\n"
    env = {**os.environ, "BOOTC_UNIFIED_CACHE": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [proc.communicate(timeout=120)[0].split() for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4
    removed = [name for output in outputs for name in output]
    assert len(removed) == len(set(removed)) == 2000  # two of each group's four, each once
    assert set(removed) | {p.name for p in installed.iterdir()} == stale
