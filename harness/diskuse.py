"""Disk use with shared data counted once, by what the kernel says (standard library and
harness.checks only, so it also runs in a guest: `python3 -m harness.diskuse STORE REPO` prints
the figures as JSON).

`du` counts a hardlinked inode once when its links are in one invocation, but a reflinked extent
(btrfs, XFS) once per file. Here every inode is counted once (st_dev, st_ino) and every data
extent once by its physical range (FIEMAP; overlapping ranges are merged), so a repository whose
objects share their data with a containers-storage, by hardlink or by reflink, adds only what is
not shared. Extents FIEMAP cannot place (btrfs inline data, delayed allocation, unknown location)
count their length for their file alone; directories and symlinks count their st_blocks.
`plain` is what the same files take without any sharing: each inode's own st_blocks, the cost of
a plain copy.

Figures for the qualification report (`figures(store, repo)`):
- bootc_store_bytes: the store, each extent once;
- repository_extra_bytes: (store and repository together) - store: what the repository adds;
- plain_copy_bytes: the repository's files as a plain copy would allocate them.
Nothing here calls bootc_unified code.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from harness.checks import (
    FIEMAP_EXTENT_DATA_INLINE,
    FIEMAP_EXTENT_DELALLOC,
    FIEMAP_EXTENT_UNKNOWN,
    fiemap,
)

UNPLACED = FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_UNKNOWN


@dataclass(frozen=True)
class Inode:
    ranges: tuple[tuple[int, int], ...]  # physical [start, end) of each placed data extent
    own: int  # bytes counted for this inode alone (unplaced extents, or st_blocks of a non-file)
    blocks: int  # st_blocks * 512: what the inode allocates if nothing is shared
    regular: bool


@dataclass
class Usage:
    allocated: int = 0  # bytes on disk, every inode and every physical extent once
    plain: int = 0  # bytes without sharing: the sum of each inode's st_blocks * 512
    files: int = 0  # regular files (distinct inodes)
    inodes: dict[tuple[int, int], Inode] = field(default_factory=dict, repr=False)


def inode(path: str, st: os.stat_result) -> Inode:
    if not stat.S_ISREG(st.st_mode):
        return Inode((), st.st_blocks * 512, st.st_blocks * 512, False)
    ranges: list[tuple[int, int]] = []
    own = 0
    for e in fiemap(path):
        if e.flags & UNPLACED:
            own += e.length
        else:
            ranges.append((e.physical, e.physical + e.length))
    return Inode(tuple(ranges), own, st.st_blocks * 512, True)


def walk(roots: Iterable[str]) -> dict[tuple[int, int], Inode]:
    """Every inode under `roots` (the roots included), once; symlinks are not followed and a
    mount point below a root is not crossed (as `du -x`)."""
    seen: dict[tuple[int, int], Inode] = {}

    def visit(path: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            seen[key] = inode(path, st)

    for root in roots:
        top = os.lstat(root)
        visit(root, top)
        for dirpath, dirs, names in os.walk(root):
            for name in [*dirs, *names]:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                if st.st_dev != top.st_dev:
                    if name in dirs:
                        dirs.remove(name)
                    continue
                visit(path, st)
    return seen


def union_length(ranges: Iterable[tuple[int, int]]) -> int:
    """Bytes covered by the union of [start, end) ranges."""
    total, end = 0, -1
    for start, stop in sorted(ranges):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def usage(inodes: dict[tuple[int, int], Inode]) -> Usage:
    values = inodes.values()
    return Usage(
        allocated=union_length(r for i in values for r in i.ranges) + sum(i.own for i in values),
        plain=sum(i.blocks for i in values),
        files=sum(1 for i in values if i.regular),
        inodes=inodes,
    )


def measure(*roots: str) -> Usage:
    """The usage of `roots` together."""
    return usage(walk(roots))


def figures(store: str, repo: str) -> dict[str, int]:
    """The report's store, repository-extra and plain-copy figures (one walk of each tree)."""
    s, r = walk([store]), walk([repo])
    alone = usage(s)
    together = usage({**s, **r})
    return {
        "bootc_store_bytes": alone.allocated,
        "repository_extra_bytes": together.allocated - alone.allocated,
        "plain_copy_bytes": usage(r).plain,
        "repository_files": usage(r).files,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python3 -m harness.diskuse STORE REPO", file=sys.stderr)
        return 2
    print(json.dumps(figures(argv[0], argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
