"""Flattening layers: overlay semantics and bad entries, on layer streams made from exact tars.

Each bad entry is refused with one line naming the layer (its DiffID) and the entry.
"""

from __future__ import annotations

import stat
import tarfile
from pathlib import Path

import pytest

from bootc_unified.erofs.tree import Directory, Regular, Symlink
from bootc_unified.layertree import LayerError, flatten
from bootc_unified.repository import Repository
from testsupport.tarlayer import entry, layer_from_tar, make_tar


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", insecure=True)


def flat(repo: Repository, *layers: bytes) -> Directory:
    return flatten(repo, [layer_from_tar(repo, t) for t in layers])


BASE = make_tar(entry("etc", b"", type=tarfile.DIRTYPE, mode=0o755), entry("etc/os-release"), entry("target"))


@pytest.mark.parametrize(
    ("bad", "entry", "why"),
    [
        (make_tar(entry("../x")), "../x", "'..'"),
        (make_tar(entry("a/../../b")), "a/../../b", "'..'"),
        (make_tar(entry("hl", type=tarfile.LNKTYPE, linkname="nothere")), "hl", "does not exist"),
        (
            make_tar(entry("hl", type=tarfile.LNKTYPE, linkname="later"), entry("later")),
            "hl",
            "does not exist",
        ),
        (make_tar(entry("dup", b"1" * 100), entry("dup", b"2" * 200)), "dup", "duplicate"),
        (
            make_tar(entry("lnk", type=tarfile.SYMTYPE, linkname="/etc"), entry("lnk/passwd")),
            "lnk/passwd",
            "symlink",
        ),
        (make_tar(entry("big", pax_headers={"SCHILY.xattr.user.big": "v" * 65536})), "big", "EROFS"),
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
        make_tar(
            entry("/abs"),
            entry("s1", type=tarfile.SYMTYPE, linkname="s2"),
            entry("s2", type=tarfile.SYMTYPE, linkname="s1"),
        ),
    )
    assert isinstance(root.entries[b"abs"], Regular)
    s1 = root.entries[b"s1"]
    assert isinstance(s1, Symlink) and s1.target == b"s2"


def test_whiteouts_opaque_and_hardlinks(repo: Repository) -> None:
    lower = make_tar(
        entry("d", b"", type=tarfile.DIRTYPE, mode=0o755),
        entry("d/a"),
        entry("d/b"),
        entry("o", b"", type=tarfile.DIRTYPE, mode=0o755),
        entry("o/old"),
        entry("gone"),
        entry("keep", b"k" * 70),
        entry("keep-link", type=tarfile.LNKTYPE, linkname="keep"),
    )
    upper = make_tar(
        entry("d/.wh.a", b""),
        entry("o/.wh..wh..opq", b""),
        entry("o/new"),
        entry("gone", type=tarfile.CHRTYPE, devmajor=0, devminor=0),  # overlay-style whiteout
        entry("d/c", mode=0o4755, uid=70000, gid=70001),
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


def test_a_directory_replaced_in_the_same_layer_is_not_reused(repo: Repository) -> None:
    """Directories are found by path once per layer; a directory that leaves the tree (a file in
    its place, a whiteout) is not found again: what follows goes where overlayfs puts it."""
    lower = make_tar(entry("d", b"", type=tarfile.DIRTYPE, mode=0o755), entry("d/a"), entry("w/old"))
    replaced = make_tar(entry("d/b"), entry("d"), entry("d/c"))  # d/b caches d; d becomes a file
    layer = layer_from_tar(repo, replaced)
    with pytest.raises(LayerError, match=r"entry 'd/c': parent d is not a directory"):
        flatten(repo, [layer_from_tar(repo, lower), layer])
    root = flat(repo, lower, make_tar(entry("w/x"), entry(".wh.w", b""), entry("w/y")))
    w = root.entries[b"w"]
    assert isinstance(w, Directory) and sorted(w.entries) == [b"x", b"y"]  # whiteouts act first


@pytest.mark.parametrize(
    "name",
    ["a/b/c", "a/b/", "/a/b", "./a", "a//b", "a/./b", "a/../b", "a/b/..", "", "/", ".", "a/.b/..c"],
)
def test_entry_names_are_cleaned_as_go_filepath_clean(name: str) -> None:
    """The fast path for clean names and the general one agree with a lexical clean (posixpath)."""
    import posixpath

    from bootc_unified.cstorage.reassemble import name_parts

    expected = [p for p in posixpath.normpath("/" + name).split("/") if p]
    assert name_parts(name.encode()) == [p.encode() for p in expected]
