"""Flattening layers: overlay semantics and bad entries, on layer streams made from exact tars.

Each bad entry is refused with one line naming the layer (its DiffID) and the entry.
"""

from __future__ import annotations

import io
import stat
import tarfile
from pathlib import Path

import pytest

from bootc_unified.erofs.tree import Directory, Regular, Symlink
from bootc_unified.layertree import LayerError, flatten
from bootc_unified.repository import Repository
from harness.tarlayer import layer_from_tar

Entry = tuple[str, bytes, dict[str, object]]


def tar(*entries: Entry) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, kw in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            for k, v in kw.items():
                setattr(ti, k, v)
            ti.size = len(data) if ti.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
            tf.addfile(ti, io.BytesIO(data) if ti.size else None)
    return buf.getvalue()


def f(name: str, data: bytes = b"x" * 100, **kw: object) -> Entry:
    return (name, data, kw)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", insecure=True)


def flat(repo: Repository, *layers: bytes) -> Directory:
    return flatten(repo, [layer_from_tar(repo, t) for t in layers])


BASE = tar(f("etc", b"", type=tarfile.DIRTYPE, mode=0o755), f("etc/os-release"), f("target"))


@pytest.mark.parametrize(
    ("bad", "entry", "why"),
    [
        (tar(f("../x")), "../x", "'..'"),
        (tar(f("a/../../b")), "a/../../b", "'..'"),
        (tar(f("hl", type=tarfile.LNKTYPE, linkname="nothere")), "hl", "does not exist"),
        (tar(f("hl", type=tarfile.LNKTYPE, linkname="later"), f("later")), "hl", "does not exist"),
        (tar(f("dup", b"1" * 100), f("dup", b"2" * 200)), "dup", "duplicate"),
        (tar(f("lnk", type=tarfile.SYMTYPE, linkname="/etc"), f("lnk/passwd")), "lnk/passwd", "symlink"),
        (tar(f("big", pax_headers={"SCHILY.xattr.user.big": "v" * 65536})), "big", "EROFS"),
    ],
)
def test_bad_entries_are_refused_naming_layer_and_entry(
    repo: Repository, bad: bytes, entry: str, why: str
) -> None:
    layer = layer_from_tar(repo, bad)
    with pytest.raises(LayerError) as info:
        flatten(repo, [layer_from_tar(repo, BASE), layer])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"layer {layer[0]}: entry {entry!r}: ")
    assert why in message


def test_absolute_names_and_symlink_loops_as_podman(repo: Repository) -> None:
    root = flat(
        repo,
        BASE,
        tar(
            f("/abs"),
            f("s1", type=tarfile.SYMTYPE, linkname="s2"),
            f("s2", type=tarfile.SYMTYPE, linkname="s1"),
        ),
    )
    assert isinstance(root.entries[b"abs"], Regular)
    s1 = root.entries[b"s1"]
    assert isinstance(s1, Symlink) and s1.target == b"s2"


def test_whiteouts_opaque_and_hardlinks(repo: Repository) -> None:
    lower = tar(
        f("d", b"", type=tarfile.DIRTYPE, mode=0o755),
        f("d/a"),
        f("d/b"),
        f("o", b"", type=tarfile.DIRTYPE, mode=0o755),
        f("o/old"),
        f("gone"),
        f("keep", b"k" * 70),
        f("keep-link", type=tarfile.LNKTYPE, linkname="keep"),
    )
    upper = tar(
        f("d/.wh.a", b""),
        f("o/.wh..wh..opq", b""),
        f("o/new"),
        f("gone", type=tarfile.CHRTYPE, devmajor=0, devminor=0),  # overlay-style whiteout
        f("d/c", mode=0o4755, uid=70000, gid=70001),
    )
    root = flat(repo, lower, upper)
    d, o = root.entries[b"d"], root.entries[b"o"]
    assert isinstance(d, Directory) and isinstance(o, Directory)
    assert sorted(d.entries) == [b"b", b"c"]
    assert sorted(o.entries) == [b"new"]
    assert b"gone" not in root.entries
    c = d.entries[b"c"]
    assert stat.S_IMODE(c.mode) == 0o4755 and (c.uid, c.gid) == (70000, 70001)
    assert root.entries[b"keep"] is root.entries[b"keep-link"]
    keep = root.entries[b"keep"]
    assert isinstance(keep, Regular) and keep.object_id is not None and keep.data is None
