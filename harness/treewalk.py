"""Walk a directory tree into one record per path, as the kernel shows it (standard library only).

This module runs on the host and, copied into a guest with `put()`, in a VM
(`python3 -m harness.treewalk ROOT` prints the snapshot as JSON), so that both sides of a
comparison are recorded by the same code; harness.treecompare compares the snapshots.

A record holds type, mode, owner, size, content sha256, symlink target, rdev, mtime (seconds and
nanoseconds) and xattrs (minus overlayfs internals); hardlink groups are sets of paths.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

HIDDEN_XATTR_PREFIXES = (b"trusted.overlay.",)


@dataclass(frozen=True)
class Record:
    kind: str
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int | None
    sha256: str | None
    target: bytes | None
    rdev: int | None
    mtime: int  # seconds since the epoch
    mtime_nsec: int
    xattrs: tuple[tuple[bytes, bytes], ...]


@dataclass
class Snapshot:
    records: dict[bytes, Record]
    hardlinks: list[list[bytes]]


KIND = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def visible(xattrs: dict[bytes, bytes]) -> tuple[tuple[bytes, bytes], ...]:
    """The xattrs a comparison looks at, sorted: overlayfs's own (trusted.overlay.*) left out."""
    return tuple(sorted((k, v) for k, v in xattrs.items() if not k.startswith(HIDDEN_XATTR_PREFIXES)))


def read_xattrs(path: bytes) -> dict[bytes, bytes]:
    """All xattrs of `path` itself; a filesystem without xattr support has none. Any other error
    (EACCES, EIO, ...) propagates: a tree we cannot read is not an empty one."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    return {os.fsencode(n): os.getxattr(path, n, follow_symlinks=False) for n in names}


def _sha256_file(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _paths(root: bytes) -> list[tuple[bytes, bytes]]:
    """(path relative to root as b"/a/b", full path) for root and everything under it."""
    out = [(b"/", root)]
    stack = [(b"", root)]
    while stack:
        rel, full = stack.pop()
        with os.scandir(full) as it:
            for entry in it:
                child = (rel + b"/" + entry.name, entry.path)
                out.append(child)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(child)
    return out


def snapshot_dir(root: Path | str, ghosts: list[bytes] | None = None) -> Snapshot:
    """Records for every path under `root` (the root itself is b"/"). With `ghosts`, a name that a
    directory lists but lstat cannot find (overlayfs lists a lower layer's whiteout in a directory it
    does not merge) is appended there instead of failing the walk."""
    records: dict[bytes, Record] = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}
    for rel, full in _paths(os.fsencode(root)):
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            if ghosts is None:
                raise
            ghosts.append(rel)
            continue
        fmt = stat.S_IFMT(st.st_mode)
        records[rel] = Record(
            kind=KIND[fmt],
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if fmt == stat.S_IFREG else None,
            sha256=_sha256_file(full) if fmt == stat.S_IFREG else None,
            target=os.readlink(full) if fmt == stat.S_IFLNK else None,
            rdev=st.st_rdev if fmt in (stat.S_IFCHR, stat.S_IFBLK) else None,
            mtime=st.st_mtime_ns // 1_000_000_000,
            mtime_nsec=st.st_mtime_ns % 1_000_000_000,
            xattrs=visible(read_xattrs(full)),
        )
        if fmt != stat.S_IFDIR and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    return Snapshot(records, sorted(sorted(g) for g in inodes.values() if len(g) > 1))


# --- JSON, to carry a snapshot out of a guest (bytes as hex) -------------------------------------


def to_json(snap: Snapshot) -> str:
    def record(r: Record) -> dict[str, object]:
        d = asdict(r)
        d["target"] = None if r.target is None else r.target.hex()
        d["xattrs"] = [[k.hex(), v.hex()] for k, v in r.xattrs]
        return d

    return json.dumps(
        {
            "records": {p.hex(): record(r) for p, r in snap.records.items()},
            "hardlinks": [[p.hex() for p in g] for g in snap.hardlinks],
        }
    )


def from_json(text: str) -> Snapshot:
    raw = json.loads(text)
    records = {}
    for p, d in raw["records"].items():
        d["target"] = None if d["target"] is None else bytes.fromhex(d["target"])
        d["xattrs"] = tuple((bytes.fromhex(k), bytes.fromhex(v)) for k, v in d["xattrs"])
        records[bytes.fromhex(p)] = Record(**d)
    return Snapshot(records, [[bytes.fromhex(p) for p in g] for g in raw["hardlinks"]])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 -m harness.treewalk ROOT")
    print(to_json(snapshot_dir(sys.argv[1])))
