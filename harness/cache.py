"""The build cache outside the repository, and file locks that make it safe for parallel workers.

Everything expensive (the mmdebstrap rootfs, buildah's image store, base disks, the SSH key) lives
under one directory: `$BOOTC_UNIFIED_CACHE`, default /var/cache/bootc-unified. Entries are named
by a hash of their inputs, written under a temporary name and renamed into place, and built while
holding an exclusive `flock` on `locks/<name>.lock`, so two pytest-xdist workers never build the
same thing twice or read half of it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/bootc-unified")


def cache_dir() -> Path:
    path = Path(os.environ.get("BOOTC_UNIFIED_CACHE", DEFAULT_CACHE))
    path.mkdir(parents=True, exist_ok=True)
    return path


def subdir(name: str) -> Path:
    path = cache_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def file_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock named `name` (blocks until the other holder is done)."""
    path = subdir("locks") / f"{name}.lock"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def digest(*parts: str | bytes) -> str:
    """A short, stable key over `parts` (in order)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def tree_digest(root: Path, suffixes: tuple[str, ...] = (".py",)) -> str:
    """A key over the relative paths and contents of the files under `root` with these suffixes."""
    parts: list[str | bytes] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes):
        if "__pycache__" in path.parts:
            continue
        parts += [str(path.relative_to(root)), path.read_bytes()]
    return digest(*parts)


# Entries are named `<group>-<key>.<ext>` (disks/v1-ext4-<key>.raw, installed/ext4-unified-<key>.qcow2)
# or `<key>.<ext>` (rootfs/<key>.tar): every change to the sources makes new keys, so old ones pile
# up (a disk is ~1 GB, and a day of work left 60 GB).
_KEYED = re.compile(r"^(?:(?P<group>.+)-)?(?P<key>[0-9a-f]{16})(?P<ext>(?:\.[a-z0-9]+)+)$")
PRUNED = ("disks", "installed", "rootfs")


PRUNE_MIN_AGE = 3 * 3600.0


def _mtime(paths: list[Path]) -> float | None:
    """When this key was built (its newest file), or None if another process removed it meanwhile."""
    try:
        return max(p.stat().st_mtime for p in paths)
    except FileNotFoundError:
        return None


def prune(keep: int = 2, names: tuple[str, ...] = PRUNED, min_age: float = PRUNE_MIN_AGE) -> list[Path]:
    """Delete all but the `keep` newest keys of each group in these cache subdirectories (newest by
    mtime: when the entry was built), except keys built within `min_age` seconds; returns what was
    deleted. The age spares what concurrent runs of other source trees (a developer's worktrees,
    parallel sessions) are using: a VM restarted on a reboot opens its base disk again. Concurrent
    prunes (parallel pytest runs) take turns on a lock, so each entry is deleted once."""
    removed = []
    with file_lock("prune"):
        for name in names:
            directory = cache_dir() / name
            if not directory.is_dir():
                continue
            groups: dict[str, dict[str, list[Path]]] = {}
            for path in directory.iterdir():
                m = _KEYED.match(path.name)
                if m and path.is_file():
                    groups.setdefault(m["group"] or "", {}).setdefault(m["key"], []).append(path)
            for keys in groups.values():
                built = {key: t for key, paths in keys.items() if (t := _mtime(paths)) is not None}
                newest = sorted(built, key=built.__getitem__, reverse=True)
                for key in newest[keep:]:
                    if time.time() - built[key] < min_age:
                        continue
                    for path in keys[key]:
                        path.unlink(missing_ok=True)
                        removed.append(path)
    return removed
