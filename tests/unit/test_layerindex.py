"""The layer cache (bootc_unified.layerindex): a build from it gives the same EROFS image as a build
that parses every stream; a damaged or foreign cache file is a miss, never an error; GC drops the
files of the streams it removes."""

from __future__ import annotations

import stat
import tarfile
from pathlib import Path

import pytest

from bootc_unified.erofs import write_image
from bootc_unified.importer import layer_content_id
from bootc_unified.layerindex import load
from bootc_unified.layertree import flatten
from bootc_unified.repository import LAYER_CACHE, Repository
from testsupport.tarlayer import entry, layer_from_tar, make_tar

LOWER = make_tar(
    entry("etc", b"", type=tarfile.DIRTYPE, mode=0o755),
    entry("etc/os-release", b"ID=test\n"),
    entry("usr/bin/tool", b"\x7fELF" * 100, mode=0o4755, pax_headers={"SCHILY.xattr.user.k": "v"}),
    entry("usr/bin/alias", type=tarfile.LNKTYPE, linkname="usr/bin/tool"),
    entry("lib", type=tarfile.SYMTYPE, linkname="usr/lib"),
)
UPPER = make_tar(entry("etc/.wh.os-release", b""), entry("etc/new", b"n" * 500))


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", insecure=True)


def image_of(repo: Repository, layers: list[tuple[str, str]]) -> bytes:
    return write_image(flatten(repo, layers), repo.alg)


def spoil_streams(repo: Repository, layers: list[tuple[str, str]]) -> None:
    """Make every layer stream unreadable as a stream: only the cache can give its members now."""
    for _, stream_id in layers:
        path = repo.objects.path_of(stream_id)
        path.unlink()
        path.write_bytes(b"not a splitstream")


def test_a_build_from_the_cache_equals_one_from_the_streams(repo: Repository, tmp_path: Path) -> None:
    layers = [layer_from_tar(repo, LOWER), layer_from_tar(repo, UPPER)]
    parsed = image_of(repo, layers)
    for diff_id, stream_id in layers:
        assert (repo.path / LAYER_CACHE / stream_id).is_file()
        assert load(repo.path, stream_id, diff_id) is not None
    for path in (repo.path / "cache", repo.path / LAYER_CACHE):  # root only, as objects/
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    spoil_streams(repo, layers)
    assert image_of(repo, layers) == parsed
    # The oracle without any cache: a fresh repository that parses the same tars.
    other = Repository.init(tmp_path / "other", insecure=True)
    assert image_of(other, [layer_from_tar(other, LOWER), layer_from_tar(other, UPPER)]) == parsed


@pytest.mark.parametrize("damage", ["torn", "flipped", "empty", "other-format"])
def test_a_damaged_cache_file_is_a_miss_and_is_rewritten(repo: Repository, damage: str) -> None:
    layers = [layer_from_tar(repo, LOWER)]
    expected = image_of(repo, layers)
    diff_id, stream_id = layers[0]
    path = repo.path / LAYER_CACHE / stream_id
    raw = path.read_bytes()
    spoiled = {
        "torn": raw[: len(raw) // 2],
        "flipped": raw[:-1] + bytes([raw[-1] ^ 1]),
        "empty": b"",
        "other-format": b"bootc-unified layer members 0\n" + raw[30:],
    }[damage]
    path.write_bytes(spoiled)
    assert load(repo.path, stream_id, diff_id) is None
    assert image_of(repo, layers) == expected
    assert path.read_bytes() == raw


def test_a_cache_file_of_another_layer_is_a_miss(repo: Repository) -> None:
    lower, upper = layer_from_tar(repo, LOWER), layer_from_tar(repo, UPPER)
    expected = image_of(repo, [upper])
    cache = repo.path / LAYER_CACHE
    image_of(repo, [lower])
    (cache / upper[1]).write_bytes((cache / lower[1]).read_bytes())
    assert load(repo.path, upper[1], upper[0]) is None
    assert image_of(repo, [upper]) == expected


def test_gc_drops_the_cache_of_removed_streams_only(repo: Repository) -> None:
    kept, dropped = layer_from_tar(repo, LOWER), layer_from_tar(repo, UPPER)
    image_of(repo, [kept, dropped])
    repo.set_stream_ref("kept", layer_content_id(kept[0]))
    cache = repo.path / LAYER_CACHE
    (cache / ".tmp-crashed").write_bytes(b"half")
    assert repo.gc(dry_run=True).removed_objects
    assert sorted(p.name for p in cache.iterdir()) == sorted([".tmp-crashed", kept[1], dropped[1]])
    result = repo.gc()
    assert dropped[1] in result.removed_objects and kept[1] not in result.removed_objects
    assert [p.name for p in cache.iterdir()] == [kept[1]]
    assert repo.fsck().problems == []
