"""Account for every object of a composefs repository as zero-copy from a containers-storage, by
what the kernel says (standard library and harness.checks only, so it also runs in a guest:
`python3 -m harness.zerocopy_audit REPO STORAGE` prints the audit as JSON).

Each file under REPO/objects is one of:
- metadata: the target of a link under streams/ or images/ (splitstreams and EROFS images, which
  the repository writes itself);
- hardlinked: its (st_dev, st_ino) is a regular file under STORAGE/overlay/*/diff and st_nlink >= 2;
- reflinked: FIEMAP shows data, every extent FIEMAP_EXTENT_SHARED, and its (physical, length)
  extents are exactly those of a diff/ file;
- inline: every extent FIEMAP_EXTENT_DATA_INLINE (btrfs keeps small files in the metadata tree,
  where they cannot be shared: the known exception, counted and listed);
- unaccounted: anything else, with the reason.
Nothing here calls bootc_unified code.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.checks import fiemap


@dataclass
class Audit:
    metadata: list[str] = field(default_factory=list)
    hardlinked: list[str] = field(default_factory=list)
    reflinked: list[str] = field(default_factory=list)
    inline: list[str] = field(default_factory=list)
    unaccounted: dict[str, str] = field(default_factory=dict)

    @property
    def objects(self) -> int:
        return sum(map(len, (self.metadata, self.hardlinked, self.reflinked, self.inline, self.unaccounted)))


def metadata_objects(repo: Path) -> set[str]:
    """Objects that links under streams/ and images/ (refs included) resolve to."""
    objects = os.path.realpath(repo / "objects")
    out = set()
    for sub in ("streams", "images"):
        for dirpath, _dirs, names in os.walk(repo / sub):
            for name in names:
                target = os.path.realpath(os.path.join(dirpath, name))
                if target.startswith(objects + "/"):
                    out.add(target)
    return out


def diff_files(storage: Path) -> list[tuple[str, os.stat_result]]:
    """Every regular file of every layer of an overlay containers-storage, with its lstat."""
    out = []
    for diff in sorted((storage / "overlay").glob("*/diff")):
        for dirpath, _dirs, names in os.walk(diff):
            for name in names:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode):
                    out.append((path, st))
    return out


def audit(repo: Path, storage: Path) -> Audit:
    result = Audit()
    meta = metadata_objects(repo)
    diffs = diff_files(storage)
    inodes = {(st.st_dev, st.st_ino) for _, st in diffs}
    ranges: dict[int, set[tuple[tuple[int, int], ...]]] = {}  # size -> extent maps of diff files
    for path, st in diffs:
        if st.st_size:
            ranges.setdefault(st.st_size, set()).add(tuple((e.physical, e.length) for e in fiemap(path)))
    for dirpath, _dirs, names in os.walk(repo / "objects"):
        for name in sorted(names):
            path = os.path.realpath(os.path.join(dirpath, name))
            st = os.lstat(path)
            if path in meta:
                result.metadata.append(path)
                continue
            if (st.st_dev, st.st_ino) in inodes:
                if st.st_nlink >= 2:
                    result.hardlinked.append(path)
                else:
                    result.unaccounted[path] = f"a diff/ inode with st_nlink {st.st_nlink}"
                continue
            extents = fiemap(path)
            if extents and all(e.inline for e in extents):
                result.inline.append(path)
            elif not extents:
                result.unaccounted[path] = "no extents"
            elif not all(e.shared for e in extents):
                unshared = sum(1 for e in extents if not e.shared)
                result.unaccounted[path] = f"{unshared} of {len(extents)} extents not shared"
            elif tuple((e.physical, e.length) for e in extents) not in ranges.get(st.st_size, set()):
                result.unaccounted[path] = "shared extents, but not those of any diff/ file"
            else:
                result.reflinked.append(path)
    return result


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python3 -m harness.zerocopy_audit REPO STORAGE")
    print(json.dumps(asdict(audit(Path(sys.argv[1]), Path(sys.argv[2])))))
