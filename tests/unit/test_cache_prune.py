"""The build cache's prune (harness.cache.prune): old keys go, the newest two of each group and
anything built recently stay. Oracle: the directory listing after the call."""

from __future__ import annotations

import os
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
