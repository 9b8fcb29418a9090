"""Sample directory trees that exercise every corner of the composefs EROFS writer.

`make_sample_tree(path)` builds, on a real filesystem, as root: file sizes around the inline
limit and block size, hardlink groups, relative/absolute/long symlinks, a FIFO, a socket, char
and block devices, setuid/setgid/sticky modes, ids above 65535, mtimes with nanoseconds,
user./security./trusted.overlay. xattrs (shared and unique), a non-UTF-8 name, 255-byte names,
a directory of thousands of entries, deep nesting and an empty directory.
`compare_trees(a, b)` lists every difference between two directory trees as the kernel shows them.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import struct
from pathlib import Path

from harness.treewalk import read_xattrs

MANY = 3000  # entries of the big directory
DEPTH = 60  # nesting levels

# security.capability: VFS_CAP_REVISION_2 | effective, cap_net_raw (13) permitted.
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def _data(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _set_times(path: Path, seconds: int, nsec: int) -> None:
    ns = seconds * 1_000_000_000 + nsec
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def make_sample_tree(root: Path, many: int = MANY, depth: int = DEPTH) -> None:
    root.mkdir(parents=True, exist_ok=True)
    files = root / "files"
    files.mkdir()
    for size in (0, 1, 63, 64, 65, 4095, 4096, 4097, 1 << 20, (1 << 20) + 1):
        (files / f"size-{size}").write_bytes(_data(size, size))
    (files / "same-a").write_bytes(b"identical content, more than sixty-four bytes long ........... .")
    (files / "same-b").write_bytes((files / "same-a").read_bytes() + b"!")
    (files / "same-c").write_bytes((files / "same-a").read_bytes() + b"!")  # same object as same-b

    links = root / "hardlinks"
    links.mkdir()
    (links / "big").write_bytes(_data(7, 10000))
    os.link(links / "big", links / "big-2")
    os.link(links / "big", files / "big-3")
    (links / "small").write_bytes(b"small hardlinked\n")
    os.link(links / "small", links / "small-2")

    sym = root / "symlinks"
    sym.mkdir()
    os.symlink("../files/size-1", sym / "relative")
    os.symlink("/usr/bin/env", sym / "absolute")
    os.symlink("dangling/target", sym / "dangling")
    os.symlink("d/" * 1000, sym / "long-2000")
    os.symlink("e/" * 1500, sym / "long-3000")
    os.symlink("x" * 255 + "/" + "y" * 255 + ("/z" * 1792), sym / "max-4095")

    special = root / "special"
    special.mkdir()
    os.mkfifo(special / "fifo")
    os.mknod(special / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(special / "chr-big", 0o600 | stat.S_IFCHR, os.makedev(4095, 0xFFFFF))
    os.mknod(special / "blk", 0o660 | stat.S_IFBLK, os.makedev(8, 1))
    os.mknod(special / "socket", 0o755 | stat.S_IFSOCK)  # bind() would cap the path at 107 bytes

    modes = root / "modes"
    modes.mkdir()
    for name, mode in (("setuid", 0o4755), ("setgid", 0o2711), ("all", 0o7777), ("none", 0o000)):
        (modes / name).write_bytes(name.encode())
        os.chmod(modes / name, mode)
    (modes / "sticky-dir").mkdir()
    os.chmod(modes / "sticky-dir", 0o1777)
    (modes / "setgid-dir").mkdir()
    os.chmod(modes / "setgid-dir", 0o2775)

    owners = root / "owners"
    owners.mkdir()
    for name, uid, gid in (("small", 1000, 1000), ("big-uid", 100000, 5), ("big-both", 4000000000, 70000)):
        (owners / name).write_bytes(b"x" * 100)
        os.chown(owners / name, uid, gid)
    os.symlink("small", owners / "link")
    os.chown(owners / "link", 123456, 654321, follow_symlinks=False)
    (owners / "dir").mkdir()
    os.chown(owners / "dir", 70000, 70001)

    xattrs = root / "xattrs"
    xattrs.mkdir()
    for i in range(5):  # the same (name, value) on several inodes: shared
        p = xattrs / f"shared-{i}"
        p.write_bytes(b"s" * (i * 40))
        os.setxattr(p, "user.shared", b"same value everywhere")
        os.setxattr(p, f"user.unique-{i}", f"value {i}".encode())
    p = xattrs / "cap"
    p.write_bytes(b"#!/bin/sh\nexit 0\n" * 10)
    os.setxattr(p, "security.capability", CAPABILITY)
    p = xattrs / "overlay-escaped"
    p.write_bytes(b"escape me")
    os.setxattr(p, "trusted.overlay.opaque", b"y")
    os.setxattr(p, "trusted.overlay.custom", b"kept")
    os.setxattr(p, "trusted.other", b"plain trusted")
    p = xattrs / "empty-value"
    p.write_bytes(b"")
    os.setxattr(p, "user.empty", b"")
    p = xattrs / "big-value"
    p.write_bytes(_data(3, 200))
    os.setxattr(p, "user.big", _data(4, 1500))
    os.setxattr(p, "user." + "n" * 250, b"long name")
    os.setxattr(xattrs, "user.on-a-dir", b"dir value")
    os.symlink("cap", xattrs / "link")
    os.setxattr(xattrs / "link", "trusted.on-symlink", b"link value", follow_symlinks=False)

    names = root / "names"
    names.mkdir()
    (names / os.fsdecode(b"latin1-\xe9t\xe9")).write_bytes(b"not utf-8 name")
    (names / ("L" * 255)).write_bytes(b"255-byte name")
    (names / ("D" * 255)).mkdir()
    (names / "-sorts-before-dot").write_bytes(b"")
    (names / " space").write_bytes(b"")
    (names / "\u00fcnicode \u2603").write_bytes(b"")

    big = root / "big-dir"
    big.mkdir()
    for i in range(many):
        (big / f"entry-{i:05d}-{'p' * (i % 40)}").write_bytes(b"" if i % 7 else b"seven")
    (big / "subdir").mkdir()

    deep = root / "deep"
    for i in range(depth):
        deep = deep / f"level-{i}"
    deep.mkdir(parents=True)
    (deep / "bottom").write_bytes(b"at the bottom")

    (root / "empty").mkdir()

    # Timestamps last (creating entries changes directory mtimes), children before parents.
    rng = random.Random(1)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*filenames, *dirnames]:
            p = Path(dirpath) / name
            _set_times(p, 1_700_000_000, 0)
        if rng.random() < 0.5:
            _set_times(Path(dirpath), 1_700_000_000, 0)
        else:
            _set_times(Path(dirpath), 1_600_000_000 + rng.randrange(10**8), rng.randrange(10**9))
    for p, sec, nsec in (
        (files / "size-1", 1_234_567_890, 123_456_789),
        (files / "size-65", 1, 999_999_999),
        (files / "size-0", 4_102_444_800, 1),  # 2100
        (sym / "relative", 1_650_000_000, 42),
        (special / "fifo", 1_500_000_000, 500),
    ):
        _set_times(p, sec, nsec)


def snapshot(root: Path) -> dict[str, dict[str, object]]:
    """Everything the kernel shows of a tree, per relative path (directory sizes left out)."""
    out: dict[str, dict[str, object]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [".", *sorted(filenames), *dirnames]:
            p = Path(dirpath) / name if name != "." else Path(dirpath)
            st = os.lstat(p)
            rel = os.fsencode(p.relative_to(root)).decode("utf-8", "backslashreplace")
            info: dict[str, object] = {
                "mode": oct(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "mtime_ns": st.st_mtime_ns,
                "xattrs": dict(sorted(read_xattrs(os.fsencode(p)).items())),
            }
            if not stat.S_ISDIR(st.st_mode):
                info["size"] = st.st_size
                info["nlink"] = st.st_nlink
                first = inodes.setdefault(st.st_ino, rel)
                info["same_inode_as"] = first
            if stat.S_ISREG(st.st_mode):
                info["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            out[rel] = info
    return out


def compare_trees(expected: Path, actual: Path) -> list[str]:
    """Human-readable differences between two trees (empty: identical as far as stat/xattrs see)."""
    a, b = snapshot(expected), snapshot(actual)
    problems = [f"missing: {p}" for p in sorted(a.keys() - b.keys())]
    problems += [f"unexpected: {p}" for p in sorted(b.keys() - a.keys())]
    for path in sorted(a.keys() & b.keys()):
        for key in sorted(a[path].keys() | b[path].keys()):
            if a[path].get(key) != b[path].get(key):
                problems.append(f"{path}: {key}: expected {a[path].get(key)!r}, got {b[path].get(key)!r}")
    return problems
