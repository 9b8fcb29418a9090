"""harness.treewalk, the tree recorder both tiers compare with: it must not hide what it cannot read,
must record mtimes to the nanosecond, and its JSON (how a guest's snapshot reaches the host) must
give back the same snapshot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.treewalk import from_json, read_xattrs, snapshot_dir, to_json


def test_read_xattrs_raises_what_is_not_a_missing_feature(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    os.setxattr(f, "user.k", b"v")
    assert read_xattrs(os.fsencode(f)) == {b"user.k": b"v"}
    # only ENOTSUP means "no xattrs"; a path that cannot be read is an error, not an empty set
    with pytest.raises(FileNotFoundError):
        read_xattrs(os.fsencode(tmp_path / "missing"))
    with pytest.raises(NotADirectoryError):
        read_xattrs(os.fsencode(f / "below-a-file"))


def test_snapshot_records_nanosecond_mtimes_and_survives_json(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    name = os.fsencode(root / "d") + b"/caf\xe9"
    with open(name, "wb") as f:
        f.write(b"data" * 30)
    os.setxattr(name, "user.bin", b"\x00\xff")
    os.link(name, root / "hard")
    os.symlink("d", root / "link")
    os.utime(name, ns=(0, 1_234_567_890_123_456_789))
    os.utime(root / "link", ns=(0, 5), follow_symlinks=False)

    snap = snapshot_dir(root)
    record = snap.records[b"/d/caf\xe9"]
    assert (record.mtime, record.mtime_nsec) == (1_234_567_890, 123_456_789)
    assert record.xattrs == ((b"user.bin", b"\x00\xff"),)
    assert (snap.records[b"/link"].mtime, snap.records[b"/link"].mtime_nsec) == (0, 5)
    assert snap.hardlinks == [[b"/d/caf\xe9", b"/hard"]]
    assert from_json(to_json(snap)) == snap
