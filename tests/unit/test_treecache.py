"""The tree cache (bootc_unified.treecache): a build that starts from a kept chain's tree gives the
same EROFS image as a build that flattens every layer, for a layer appended and for the top layer
replaced; a damaged or foreign file is a miss; GC drops the trees of chains it breaks."""

from __future__ import annotations

import stat
import tarfile
from pathlib import Path

import pytest

from bootc_unified import cachefile, treecache
from bootc_unified.erofs import write_image
from bootc_unified.erofs.tree import Device, Directory, Fifo, Regular, Socket, Symlink
from bootc_unified.importer import layer_content_id
from bootc_unified.layertree import flatten, flattened
from bootc_unified.repository import TREE_CACHE, Repository
from bootc_unified.repository.gc import TREE_CACHE_MAGIC
from testsupport.tarlayer import entry, layer_from_tar, make_tar

LOWER = make_tar(
    entry("etc", b"", type=tarfile.DIRTYPE, mode=0o755),
    entry("etc/os-release", b"ID=test\n"),
    entry("usr/bin/tool", b"\x7fELF" * 100, mode=0o4755, pax_headers={"SCHILY.xattr.user.k": "v"}),
    entry("usr/bin/alias", type=tarfile.LNKTYPE, linkname="usr/bin/tool"),
    entry("lib", type=tarfile.SYMTYPE, linkname="usr/lib"),
    entry("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
    entry("run/fifo", type=tarfile.FIFOTYPE),
)
MIDDLE = make_tar(entry("etc/.wh.os-release", b""), entry("etc/new", b"n" * 500))
APPENDED = make_tar(entry("usr/bin/.wh.alias", b""), entry("srv/data", b"d" * 4097))
REPLACED = make_tar(entry("etc/new", b"m" * 300), entry("usr/.wh..wh..opq", b""), entry("usr/x", b"x"))


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", insecure=True)


def build(repo: Repository, layers: list[tuple[str, str]]) -> bytes:
    with flattened(repo, layers) as root:
        return write_image(root, repo.alg)


def fresh_build(tmp_path: Path, tars: list[bytes]) -> bytes:
    """The oracle: a repository that has never kept a tree."""
    other = Repository.init(tmp_path / f"fresh-{len(list(tmp_path.iterdir()))}", insecure=True)
    return write_image(flatten(other, [layer_from_tar(other, t) for t in tars]), other.alg)


def chain(layers: list[tuple[str, str]]) -> list[str]:
    return [stream_id for _, stream_id in layers]


def test_encode_decode_keeps_every_kind_and_hardlinks() -> None:
    tool = Regular(mode=stat.S_IFREG | 0o755, size=100, object_id="ab" * 32, xattrs={b"user.k": b"v"})
    root = Directory(mode=stat.S_IFDIR | 0o755, mtime=7, mtime_nsec=9)
    usr = Directory(mode=stat.S_IFDIR | 0o700, uid=1, gid=2)
    root.entries = {
        b"usr": usr,
        b"small": Regular(mode=stat.S_IFREG | 0o644, size=3, data=b"abc"),
        b"link": Symlink(mode=stat.S_IFLNK | 0o777, target=b"usr/tool"),
        b"null": Device(mode=stat.S_IFCHR | 0o666, rdev=0x103),
        b"fifo": Fifo(mode=stat.S_IFIFO | 0o600),
        b"sock": Socket(mode=stat.S_IFSOCK | 0o600),
        b"empty": Directory(mode=stat.S_IFDIR | 0o755),
    }
    usr.entries = {b"tool": tool, b"alias": tool}
    back = treecache.decode(treecache.encode(root))
    assert back == root
    back_usr = back.entries[b"usr"]
    assert isinstance(back_usr, Directory)
    assert back_usr.entries[b"tool"] is back_usr.entries[b"alias"]  # one inode, two names
    assert list(back.entries) == list(root.entries)  # entry order kept


@pytest.mark.parametrize("top", ["appended", "replaced"])
def test_a_build_from_a_kept_chain_equals_a_fresh_build(repo: Repository, tmp_path: Path, top: str) -> None:
    old = [layer_from_tar(repo, LOWER), layer_from_tar(repo, MIDDLE)]
    assert build(repo, old) == fresh_build(tmp_path, [LOWER, MIDDLE])
    # Both the whole chain and the chain without its top layer are kept.
    assert treecache.has(repo.path, chain(old)) and treecache.has(repo.path, chain(old[:1]))
    for path in (repo.path / "cache", repo.path / TREE_CACHE):  # root only, as objects/
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    if top == "appended":
        tars, new = [LOWER, MIDDLE, APPENDED], [*old, layer_from_tar(repo, APPENDED)]
        prefix = old
    else:
        tars, new = [LOWER, REPLACED], [old[0], layer_from_tar(repo, REPLACED)]
        prefix = old[:1]
    tree, covered = treecache.longest_prefix(repo.path, chain(new))
    assert tree is not None and covered == len(prefix)
    assert build(repo, new) == fresh_build(tmp_path, tars)
    assert treecache.has(repo.path, chain(new))
    # and from the new chain's own tree, once kept
    assert build(repo, new) == fresh_build(tmp_path, tars)


@pytest.mark.parametrize("damage", ["torn", "flipped", "empty", "other-chain", "other-format"])
def test_a_damaged_tree_file_is_a_miss(repo: Repository, tmp_path: Path, damage: str) -> None:
    layers = [layer_from_tar(repo, LOWER), layer_from_tar(repo, MIDDLE)]
    expected = build(repo, layers)
    path = repo.path / TREE_CACHE / treecache._path(repo.path, chain(layers)).name
    raw = path.read_bytes()
    other = (repo.path / TREE_CACHE / treecache._path(repo.path, chain(layers[:1])).name).read_bytes()
    path.write_bytes(
        {
            "torn": raw[: len(raw) // 2],
            "flipped": raw[:-1] + bytes([raw[-1] ^ 1]),
            "empty": b"",
            "other-chain": other,
            "other-format": b"bootc-unified tree 0\n" + raw[len(TREE_CACHE_MAGIC) :],
        }[damage]
    )
    assert treecache.load(repo.path, chain(layers)) is None
    assert treecache.longest_prefix(repo.path, chain(layers))[1] == 1  # the next best chain
    assert build(repo, layers) == expected == fresh_build(tmp_path, [LOWER, MIDDLE])


def test_gc_drops_the_trees_of_broken_chains_only(repo: Repository) -> None:
    kept, dropped = layer_from_tar(repo, LOWER), layer_from_tar(repo, MIDDLE)
    build(repo, [kept, dropped])
    repo.set_stream_ref("kept", layer_content_id(kept[0]))
    trees = repo.path / TREE_CACHE
    (trees / f"{cachefile.TMP_PREFIX}crashed").write_bytes(b"half")
    (trees / "foreign").write_bytes(b"not a tree")
    assert len(list(trees.iterdir())) == 4
    result = repo.gc()
    assert dropped[1] in result.removed_objects and kept[1] not in result.removed_objects
    assert [p.name for p in trees.iterdir()] == [treecache._path(repo.path, [kept[1]]).name]
    assert treecache.load(repo.path, [kept[1]]) == flatten(repo, [kept])
    assert repo.fsck().problems == []
