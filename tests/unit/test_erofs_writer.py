"""composefs EROFS writer and reader against erofs-utils (fsck.erofs, dump.erofs) and round trips.

The kernel's view (mounting) is in tests/storage/test_erofs_mount.py.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from bootc_unified.erofs import Device, Directory, Fifo, Regular, Socket, Symlink, from_directory, write_image
from bootc_unified.erofs import format as fmt
from bootc_unified.erofs.reader import read_image, referenced_objects
from bootc_unified.erofs.tree import hardlink_groups, object_ids, walk
from bootc_unified.erofs.xxh32 import xxh32
from bootc_unified.verity import HashAlg, digest_bytes
from harness.pytest_plugin import require
from testsupport.erofs_samples import make_sample_tree, snapshot

ALG = HashAlg.SHA512


def erofs_utils() -> None:
    missing = [t for t in ("fsck.erofs", "dump.erofs") if shutil.which(t) is None]
    require([f"{t} (erofs-utils)" for t in missing], "checking EROFS images")


def digest_of(path: Path) -> str:
    return digest_bytes(path.read_bytes(), ALG).hex()


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Directory, Path]:
    """The sample tree on disk, its tree model and its image (needs root: devices, owners, trusted.*)."""
    require([] if os.geteuid() == 0 else ["root"], "building the sample tree")
    base = tmp_path_factory.mktemp("erofs-sample")
    make_sample_tree(base / "src")
    tree = from_directory(base / "src", digest_of)
    image = base / "image.cfs"
    image.write_bytes(write_image(tree, ALG))
    return base / "src", tree, image


def fsck(image: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fsck.erofs", *args, str(image)], capture_output=True, text=True)


def dump(image: Path, *args: str) -> str:
    return subprocess.run(
        ["dump.erofs", *args, str(image)], check=True, capture_output=True, text=True
    ).stdout


def meta(mode: int, **kw: int) -> dict[str, int]:
    return {"mode": mode, "uid": 0, "gid": 0, "mtime": 1_700_000_000, **kw}


def small(data: bytes, **kw: int) -> Regular:
    return Regular(size=len(data), data=data, **meta(stat.S_IFREG | 0o644, **kw))


def external(size: int, seed: str = "x", **kw: int) -> Regular:
    oid = digest_bytes(seed.encode(), ALG).hex()
    return Regular(size=size, object_id=oid, **meta(stat.S_IFREG | 0o644, **kw))


def directory(entries: dict[bytes, object], **kw: int) -> Directory:
    return Directory(entries=entries, **meta(stat.S_IFDIR | 0o755, **kw))  # type: ignore[arg-type]


# --- xxh32 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "seed", "expected"),
    [
        (b"", 0, 0x02CC5D05),
        (b"abc", 0, 0x32D153FF),
        (b"Nobody inspects the spammish repetition", 0, 0xE2293B2F),
        (b"", 1, 0x0B2CB792),
    ],
)
def test_xxh32_vectors(data: bytes, seed: int, expected: int) -> None:
    assert xxh32(data, seed) == expected


# --- erofs-utils as oracles -------------------------------------------------------------------


def test_fsck_accepts_sample_image(sample: tuple[Path, Directory, Path]) -> None:
    erofs_utils()
    _, _, image = sample
    proc = fsck(image)
    assert proc.returncode == 0, proc.stderr


def source_counts(root: Path) -> tuple[int, dict[str, int]]:
    """An independent walk of the source tree with os.lstat: its number of distinct inodes, and its
    directory entries (the root included) per file type, named as `dump.erofs -S` names them."""
    names = {
        stat.S_IFREG: "regular file",
        stat.S_IFDIR: "directory",
        stat.S_IFCHR: "char dev",
        stat.S_IFBLK: "block dev",
        stat.S_IFIFO: "FIFO file",
        stat.S_IFSOCK: "SOCK file",
        stat.S_IFLNK: "symlink file",
    }
    counts = dict.fromkeys(names.values(), 0)
    inodes = set()
    for dirpath, dirnames, filenames in os.walk(root):
        paths = [Path(dirpath)] if dirpath == str(root) else []
        for name in [*dirnames, *filenames]:
            paths.append(Path(dirpath, name))
        for path in paths:
            st = os.lstat(path)
            inodes.add((st.st_dev, st.st_ino))
            counts[names[stat.S_IFMT(st.st_mode)]] += 1
    return len(inodes), counts


def dump_counts(image: Path) -> tuple[int, dict[str, int]]:
    """What dump.erofs reports: the superblock's inode count, and its per-type statistics."""
    sb = dump(image, "-s")
    inode_count = re.search(r"inode count:\s+(\d+)", sb)
    assert inode_count is not None, sb
    stats = dump(image, "-S")
    counts = {}
    for kind in (
        "regular file",
        "directory",
        "char dev",
        "block dev",
        "FIFO file",
        "SOCK file",
        "symlink file",
    ):
        found = re.search(rf"Filesystem {kind} count:\s+(\d+)\n", stats)
        assert found is not None, (kind, stats)
        counts[kind] = int(found[1])
    return int(inode_count[1]), counts


def test_dump_superblock_and_statistics(sample: tuple[Path, Directory, Path]) -> None:
    erofs_utils()
    src, _, image = sample
    sb = dump(image, "-s")
    assert "0xE0F5E1E2" in sb
    assert re.search(r"root nid:\s+36\b", sb)
    assert re.search(r"Filesystem blocks:\s+(\d+)", sb)[1] == str(image.stat().st_size // 4096)  # type: ignore[index]
    assert "chunked_file" in sb
    inodes, counts = source_counts(src)
    assert all(counts.values()), counts  # the sample has every file type
    assert dump_counts(image) == (inodes, counts)


@pytest.mark.parametrize(
    ("path", "inode_size", "layout"),
    [
        ("/files/size-1", 64, 2),  # its own mtime: extended, inline
        ("/files/size-64", 32, 2),  # compact, inline
        ("/files/size-65", 64, 4),  # external: chunk-based
        ("/files/size-4096", 32, 4),
        ("/owners/big-uid", 64, 4),  # uid > 65535: extended
        ("/symlinks/long-2000", 32, 2),  # inline target
        ("/symlinks/long-3000", 32, 0),  # target in a block
    ],
)
def test_dump_inodes(sample: tuple[Path, Directory, Path], path: str, inode_size: int, layout: int) -> None:
    erofs_utils()
    src, _, image = sample
    out = dump(image, f"--path={path}")
    st = os.lstat(src / path.lstrip("/"))
    assert re.search(rf"Inode size: {inode_size}\b", out), out
    assert re.search(rf"Layout: {layout}\b", out), out
    assert re.search(rf"Size: {st.st_size}\b", out), out
    assert re.search(rf"Links: {st.st_nlink}\b", out), out
    assert re.search(rf"Uid: {st.st_uid}\s+Gid: {st.st_gid}\b", out), out


def test_fsck_extract_matches_source(sample: tuple[Path, Directory, Path], tmp_path: Path) -> None:
    """fsck.erofs --extract (1.5) rebuilds the tree: names, types, owners, mtimes, links, devices, data.

    What 1.5 cannot show is left out: it extracts null-chunk files as empty, drops set-id bits
    (chown after chmod), and neither restores hardlinks nor xattrs.
    """
    erofs_utils()
    src, _, image = sample
    proc = fsck(image, f"--extract={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr
    keep = ("uid", "gid", "mtime_ns", "target", "rdev")

    inline = {p for p, info in snapshot(src).items() if "sha256" in info and int(str(info["size"])) <= 64}

    def view(root: Path) -> dict[str, dict[str, object]]:
        out = {}
        for path, info in snapshot(root).items():
            v = {k: info[k] for k in keep if k in info}
            v["type"] = stat.S_IFMT(int(str(info["mode"]), 8))
            if path in inline:
                v["sha256"] = info["sha256"]
            out[path] = v
        return out

    assert view(tmp_path / "out") == view(src)


# --- the reader -------------------------------------------------------------------------------


View = dict[bytes, tuple[object, ...]]


def with_link_groups(rows: View, inode_of: dict[bytes, object]) -> View:
    """Append to each multiply-linked path the smallest name of its inode (hardlink groups)."""
    names: dict[object, list[bytes]] = {}
    for path, inode in inode_of.items():
        names.setdefault(inode, []).append(path)
    for group in names.values():
        if len(group) > 1:
            for path in group:
                rows[path] += (min(group),)
    return rows


def source_view(root: Path) -> View:
    """Per path, from os.lstat and the file bytes: type and mode, owners, mtime, then the size and
    content (inline bytes or fs-verity digest), symlink target or device number, and the hardlink
    group (by inode number)."""
    rows: View = {}
    inode_of: dict[bytes, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        top = [Path(dirpath)] if dirpath == str(root) else []
        for path in top + [Path(dirpath, name) for name in [*dirnames, *filenames]]:
            key = b"/" + os.fsencode(path.relative_to(root)) if path != root else b"/"
            st = os.lstat(path)
            row: tuple[object, ...] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
            if stat.S_ISREG(st.st_mode):
                data = path.read_bytes()
                row += (st.st_size, data if st.st_size <= 64 else digest_bytes(data, ALG).hex())
            elif stat.S_ISLNK(st.st_mode):
                row += (os.fsencode(os.readlink(path)),)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                row += (st.st_rdev,)
            if not stat.S_ISDIR(st.st_mode):
                inode_of[key] = st.st_ino
            rows[key] = row
    return with_link_groups(rows, inode_of)


def image_view(tree: Directory) -> View:
    """The same view of a tree read back from an image (hardlinks: the same node object)."""
    rows: View = {}
    inode_of: dict[bytes, object] = {}
    for path, node in walk(tree):
        row: tuple[object, ...] = (node.mode, node.uid, node.gid, node.mtime * 10**9 + node.mtime_nsec)
        if isinstance(node, Regular):
            row += (node.size, node.data if node.data is not None else node.object_id)
        elif isinstance(node, Symlink):
            row += (node.target,)
        elif isinstance(node, Device):
            row += (node.rdev,)
        if not isinstance(node, Directory):
            inode_of[path] = id(node)
        rows[path] = row
    return with_link_groups(rows, inode_of)


def test_reader_round_trips_sample(sample: tuple[Path, Directory, Path]) -> None:
    src, tree, image = sample
    again = read_image(image.read_bytes())
    assert image_view(again) == source_view(src)  # against the source on disk, not our tree model
    assert again == tree
    assert hardlink_groups(again) == hardlink_groups(tree)
    assert referenced_objects(image.read_bytes()) == object_ids(tree)


def test_deterministic(sample: tuple[Path, Directory, Path]) -> None:
    src, tree, image = sample
    assert write_image(tree, ALG) == image.read_bytes()
    assert write_image(from_directory(src, digest_of), ALG) == image.read_bytes()
    # Insertion order of entries and xattrs does not matter.
    reordered = read_image(image.read_bytes())
    for _, node in walk(reordered):
        node.xattrs = dict(reversed(node.xattrs.items()))
        if isinstance(node, Directory):
            node.entries = dict(reversed(node.entries.items()))
    assert write_image(reordered, ALG) == image.read_bytes()


def edge_tree() -> Directory:
    """What a disk tree cannot easily hold: extreme xattrs, ids, times and sizes."""
    shared_leaf = small(b"hardlinked\n")
    big_leaf = external(1 << 30, "big")
    many_xattrs = small(b"many")
    many_xattrs.xattrs = {f"user.attr-{i:04d}".encode(): os.urandom(100) for i in range(300)}
    return directory(
        {
            b"max-value": Regular(
                size=0, data=b"", xattrs={b"user.v": b"v" * 65535}, **meta(stat.S_IFREG | 0o600)
            ),
            b"max-name": Regular(
                size=0, data=b"", xattrs={b"user." + b"n" * 250: b"1"}, **meta(stat.S_IFREG)
            ),
            b"many-xattrs": many_xattrs,
            b"acl": Regular(
                size=1,
                data=b"a",
                xattrs={b"system.posix_acl_access": b"\x02\x00\x00\x00", b"security.selinux": b"label\0"},
                **meta(stat.S_IFREG | 0o640),
            ),
            b"max-ids": small(b"ids", uid=2**32 - 1, gid=2**32 - 2),
            b"old": small(b"before 1970", mtime=-86400, mtime_nsec=5),
            b"future": small(b"2^40", mtime=2**40, mtime_nsec=999_999_999),
            b"huge": external(2**44 + 1, "huge"),  # 16 TiB + 1: three chunks of 8 TiB
            b"exact-chunk": external(2**43, "exact"),
            b"one-block": external(4096, "one"),
            b"a": directory({b"link1": shared_leaf, b"big1": big_leaf}),
            b"b": directory(
                {b"link2": shared_leaf, b"big2": big_leaf, b"deeper": directory({b"link3": shared_leaf})}
            ),
            b"\x80\xff": Symlink(target=b"\xfe\xfd", **meta(stat.S_IFLNK | 0o777)),
            b"dev": Device(rdev=os.makedev(259, 0x12345), **meta(stat.S_IFBLK | 0o600)),
            b"fifo": Fifo(**meta(stat.S_IFIFO | 0o644)),
            b"sock": Socket(**meta(stat.S_IFSOCK | 0o755)),
            b"empty": directory({}),
        },
        uid=1,
        mtime=5,
    )


def test_reader_round_trips_edge_tree(tmp_path: Path) -> None:
    tree = edge_tree()
    image = write_image(tree, ALG)
    again = read_image(image)
    assert again == tree
    assert hardlink_groups(again) == [
        [b"/a/big1", b"/b/big2"],
        [b"/a/link1", b"/b/deeper/link3", b"/b/link2"],
    ]
    assert referenced_objects(image) == object_ids(tree)
    erofs_utils()
    (tmp_path / "edge.cfs").write_bytes(image)
    proc = fsck(tmp_path / "edge.cfs")
    assert proc.returncode == 0, proc.stderr
    # Counted by hand from edge_tree()'s literal: 12 files (the two hardlinked pairs are one inode
    # each, 15 names), 5 directories with the root, a symlink, a block device, a FIFO, a socket.
    counts = {
        "regular file": 15,
        "directory": 5,
        "char dev": 0,
        "block dev": 1,
        "FIFO file": 1,
        "SOCK file": 1,
        "symlink file": 1,
    }
    assert dump_counts(tmp_path / "edge.cfs") == (12 + 5 + 4, counts)


def test_layout_limits() -> None:
    """Inline tails never cross a block; chunk formats cover the file; the root nid fits 16 bits."""
    image = write_image(edge_tree(), ALG)
    assert image[:4] == fmt.COMPOSEFS_MAGIC.to_bytes(4, "little")
    assert len(image) % 4096 == 0
    names = {
        i: directory({f"f{j:03d}".encode(): small(b"x" * (j % 65)) for j in range(i)}) for i in (1, 50, 500)
    }
    for tree in names.values():
        assert read_image(write_image(tree, ALG)) == tree


def test_sha256_metacopy() -> None:
    oid = digest_bytes(b"x", HashAlg.SHA256).hex()
    tree = directory({b"f": Regular(size=100, object_id=oid, **meta(stat.S_IFREG | 0o644))})
    image = write_image(tree, HashAlg.SHA256)
    assert bytes([0, 36, 0, 1]) + bytes.fromhex(oid) in image
    assert f"/{oid[:2]}/{oid[2:]}".encode() in image
    assert read_image(image) == tree


# --- bad input --------------------------------------------------------------------------------


def bad(entries: dict[bytes, object]) -> Directory:
    return directory({b"dir": directory(entries)})


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        (bad({b"a/b": small(b"")}), r"in directory '/dir': file name 'a/b' contains /"),
        (bad({b"a\0b": small(b"")}), r"in directory '/dir': file name .* contains NUL"),
        (bad({b"": small(b"")}), r"in directory '/dir': empty file name"),
        (bad({b".": small(b"")}), r"in directory '/dir': '\.' is not allowed"),
        (bad({b"..": small(b"")}), r"in directory '/dir': '\.\.' is not allowed"),
        (bad({b"n" * 256: small(b"")}), r"in directory '/dir': file name of 256 bytes exceeds 255"),
        (
            bad({b"f": Regular(size=0, data=b"", xattrs={b"user." + b"n" * 251: b""}, **meta(stat.S_IFREG))}),
            r"'/dir/f': xattr name of 256 bytes exceeds 255",
        ),
        (
            bad({b"f": Regular(size=0, data=b"", xattrs={b"user.big": b"v" * 65536}, **meta(stat.S_IFREG))}),
            r"'/dir/f': xattr 'user.big' value of 65536 bytes exceeds EROFS's 65535-byte limit",
        ),
        (
            bad(
                {
                    b"f": Regular(
                        size=0,
                        data=b"",
                        xattrs={f"user.{i}".encode(): b"v" * 60000 for i in range(5)},
                        **meta(stat.S_IFREG),
                    )
                }
            ),
            r"'/dir/f': xattrs need \d+ bytes, more than an EROFS inode holds",
        ),
        (
            bad({b"f": Regular(size=0, data=b"", xattrs={b"os2.x": b""}, **meta(stat.S_IFREG))}),
            r"'/dir/f': xattr 'os2.x' has a namespace EROFS cannot store",
        ),
        (
            bad({b"f": Regular(size=65, **meta(stat.S_IFREG))}),
            r"'/dir/f': regular file of 65 bytes needs object_id",
        ),
        (
            bad({b"f": Regular(size=100, object_id="ab" * 32, **meta(stat.S_IFREG))}),
            r"'/dir/f': .*sha512 fs-verity digest of 128 digits",
        ),
        (bad({b"f": Regular(size=3, data=b"ab", **meta(stat.S_IFREG))}), r"'/dir/f': .*needs its content"),
        (
            bad({b"f": Regular(size=1, data=b"a", **meta(stat.S_IFDIR))}),
            r"'/dir/f': mode 0o40000 does not fit",
        ),
        (
            bad({b"w": Device(rdev=0, **meta(stat.S_IFCHR))}),
            r"'/dir/w': character device 0/0 is an overlay whiteout",
        ),
        (bad({b"l": Symlink(target=b"", **meta(stat.S_IFLNK))}), r"'/dir/l': symlink target must be"),
        (bad({b"l": Symlink(target=b"x" * 4096, **meta(stat.S_IFLNK))}), r"'/dir/l': symlink target must be"),
        (bad({b"f": small(b"", uid=2**32)}), r"'/dir/f': uid 4294967296 out of range"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_trees_are_refused(tree: Directory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_image(tree, ALG)


def test_directory_twice_is_refused() -> None:
    sub = directory({})
    with pytest.raises(ValueError, match=r"'/b': a directory may appear only once"):
        write_image(directory({b"a": sub, b"b": sub}), ALG)


# --- malformed images -------------------------------------------------------------------------


def corrupt(image: bytes, offset: int, data: bytes) -> bytes:
    return image[:offset] + data + image[offset + len(data) :]


def test_malformed_images_are_refused() -> None:
    tree = directory({b"a": small(b"a"), b"b": directory({b"c": external(100)}), b"d": small(b"d")})
    image = write_image(tree, ALG)
    sb = fmt.SUPERBLOCK_OFFSET
    cases = {
        b"": "too short",
        corrupt(image, 0, b"\0\0\0\0"): "bad composefs header magic",
        corrupt(image, sb, b"\0\0\0\0"): "bad EROFS superblock magic",
        corrupt(image, sb + 12, b"\x09"): "block size",
        corrupt(image, sb + 14, (0xFFFF).to_bytes(2, "little")): "outside the image",
        image[: len(image) // 2]: "blocks but the image has",
    }
    root_inode = fmt.INODES_START
    cases[corrupt(image, root_inode + 4, (stat.S_IFREG | 0o644).to_bytes(2, "little"))] = "root inode is not"
    cases[corrupt(image, root_inode, b"\x0e")] = "unsupported data layout 7"
    # Swap two names in the root directory's inline entries: order broken.
    pos = image.index(b"..abd")
    cases[corrupt(image, pos, b"..adb")] = "not in strictly increasing"
    pos = image.index(b"/" + object_ids(tree).pop()[:2].encode() + b"/")
    cases[corrupt(image, pos + 1, b"zz")] = "redirect .* does not match"
    for data, message in cases.items():
        with pytest.raises(ValueError, match=message):
            read_image(data)
