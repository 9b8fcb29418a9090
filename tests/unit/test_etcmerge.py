"""The /etc 3-way merge on real directory trees (tmp dirs; owners and user xattrs need root and an
xattr-capable /tmp), checked file by file against hand-computed expectations."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bootc_unified.deploy import etcmerge
from bootc_unified.errors import UserError
from harness.pytest_plugin import require


@pytest.fixture(autouse=True)
def _root() -> None:
    require(["not root"] if os.geteuid() != 0 else [], "the /etc merge's owner checks")


def put(root: Path, rel: str, data: bytes, mode: int = 0o644) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def trees(tmp_path: Path) -> tuple[Path, Path, Path]:
    """pristine (booted image), current (live, with local changes), new (new image)."""
    p, c, n = (tmp_path / x for x in ("pristine", "current", "new"))
    for root in (p, c, n):
        put(root, "untouched.conf", b"p\n")
        put(root, "modified.conf", b"p\n")
        put(root, "removed.conf", b"p\n")
        put(root, "mode.conf", b"x\n")
        put(root, "owner.conf", b"o\n")
        put(root, "xattr.conf", b"xa\n")
        put(root, "mtime.conf", b"t\n")
        put(root, "d/f", b"f\n")
        put(root, "olddir/x", b"x\n")
        os.symlink("untouched.conf", root / "link")
    for rel in ("untouched.conf", "modified.conf", "removed.conf", "mode.conf", "mtime.conf"):
        put(n, rel, b"n\n")
    put(n, "olddir/y", b"y\n")
    put(n, "new-only.conf", b"only in new\n")
    put(p, "gone/keep", b"p\n")
    os.chmod(p / "gone", 0o755)
    # local changes
    put(c, "modified.conf", b"local\n")
    (c / "removed.conf").unlink()
    os.chmod(c / "mode.conf", 0o600)
    os.chown(c / "owner.conf", 1000, 1001)
    os.setxattr(c / "xattr.conf", "user.local", b"yes")
    os.utime(c / "mtime.conf", (1, 1))
    (c / "link").unlink()
    os.symlink("modified.conf", c / "link")
    put(c, "d/added", b"added\n", 0o640)
    put(c, "newdir/sub/file", b"deep\n")
    os.chmod(c / "newdir", 0o700)
    os.mkfifo(c / "fifo")  # ignored by the merge
    for rel in ("olddir/x",):
        (c / rel).unlink()
    (c / "olddir").rmdir()
    put(c, "gone/keep", b"c\n")
    os.chmod(c / "gone", 0o750)
    return p, c, n


def test_diff_and_apply(tmp_path: Path) -> None:
    p, c, n = trees(tmp_path)
    d = etcmerge.diff(p, c, n)
    assert d.added == ["d/added", "newdir", "newdir/sub", "newdir/sub/file"]
    assert d.modified == [
        "gone",
        "gone/keep",
        "link",
        "mode.conf",
        "modified.conf",
        "owner.conf",
        "xattr.conf",
    ]
    assert d.removed == ["olddir", "olddir/x", "removed.conf"]
    assert d.unmergeable == []
    assert "Unmergable" not in d.render() and "Added: d/added\n" in d.render()

    etcmerge.apply(p, c, n)
    listing = sorted(str(x.relative_to(n)) for x in n.rglob("*"))
    assert listing == sorted(
        [
            "untouched.conf", "modified.conf", "mode.conf", "owner.conf", "xattr.conf", "mtime.conf",
            "d", "d/f", "d/added", "link", "new-only.conf", "newdir", "newdir/sub", "newdir/sub/file",
            "gone", "gone/keep",
        ]
    )  # fmt: skip
    assert (n / "untouched.conf").read_bytes() == b"n\n"  # nobody touched it: the new default
    assert (n / "mtime.conf").read_bytes() == b"n\n"  # only its mtime changed: not a local change
    assert (n / "modified.conf").read_bytes() == b"local\n"  # local change wins
    assert (n / "mode.conf").read_bytes() == b"x\n"  # the local file, with its mode
    assert stat.S_IMODE(os.lstat(n / "mode.conf").st_mode) == 0o600
    st = os.lstat(n / "owner.conf")
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    assert os.getxattr(n / "xattr.conf", "user.local") == b"yes"
    assert os.readlink(n / "link") == "modified.conf"
    assert (n / "d/added").read_bytes() == b"added\n"
    assert stat.S_IMODE(os.lstat(n / "d/added").st_mode) == 0o640
    assert (n / "newdir/sub/file").read_bytes() == b"deep\n"
    assert stat.S_IMODE(os.lstat(n / "newdir").st_mode) == 0o700
    assert (n / "gone/keep").read_bytes() == b"c\n"  # parent created with current's mode
    assert stat.S_IMODE(os.lstat(n / "gone").st_mode) == 0o750
    assert (n / "new-only.conf").read_bytes() == b"only in new\n"
    assert not (n / "fifo").exists() and not (n / "olddir").exists() and not (n / "removed.conf").exists()

    # Applying again (an interrupted finalize repeated) changes nothing.
    before = etcmerge.scan(n)
    etcmerge.apply(p, c, n)
    assert etcmerge.scan(n) == before


def test_unmergeable_refused_nothing_written(tmp_path: Path) -> None:
    p, c, n = trees(tmp_path)
    put(c, "confl/inside", b"a local directory\n")  # added as a directory locally ...
    put(n, "confl", b"... a file in the new image\n")
    (c / "untouched.conf").unlink()
    (c / "untouched.conf").mkdir()  # modified file -> directory; new has a file
    before = etcmerge.scan(n)
    d = etcmerge.diff(p, c, n)
    assert d.unmergeable == ["confl", "untouched.conf"]
    assert "Unmergable: confl\n" in d.render()
    with pytest.raises(UserError) as e:
        etcmerge.apply(p, c, n)
    assert "\n" not in str(e.value)
    assert str(e.value) == (
        "Merge conflicts found in etc: /etc/confl is a directory locally and not a directory "
        "in the new image (and 1 more)"
    )
    assert etcmerge.scan(n) == before


def test_metadata_compared_mtime_ignored(tmp_path: Path) -> None:
    a = put(tmp_path, "a", b"same")
    b = put(tmp_path, "b", b"same")
    os.utime(a, (5, 5))
    assert etcmerge.meta_of(a) == etcmerge.meta_of(b)
    os.chmod(b, 0o600)
    assert etcmerge.meta_of(a) != etcmerge.meta_of(b)
    assert etcmerge.meta_of(tmp_path / "missing") is None
