"""Add every regular file of a tree to a repository, in parallel; used by the demo and bench/."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bootc_unified.repository import Repository
from bootc_unified.repository.stats import ImportStats
from harness.loopfs import LoopFs
from harness.run import run


def regular_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                yield path


@dataclass
class TreeAdd:
    stats: ImportStats
    seconds: float


def add_tree(repo: Repository, root: Path, zerocopy: bool = False, workers: int | None = None) -> TreeAdd:
    """ensure_object_from_file for each file, `workers` threads (hashing and ioctls drop the GIL)."""
    stats = ImportStats()
    start = time.monotonic()
    with repo.writer_lock(), ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        for result in pool.map(
            lambda p: repo.ensure_object_from_file(p, zerocopy=zerocopy), regular_files(root)
        ):
            stats.record(result)
    return TreeAdd(stats, time.monotonic() - start)


def tree_bytes(root: Path) -> tuple[int, int]:
    """(number of regular files, their total size in bytes)."""
    files = size = 0
    for path in regular_files(root):
        files += 1
        size += path.stat().st_size
    return files, size


def copy_tree(src: Path, dst: Path, mode: str = "copy") -> float:
    """cp the tree: mode copy (`cp -a`), hardlink (`cp -al`) or reflink (`cp -a --reflink=always`).

    Returns the seconds it took (the baseline for import ratios).
    """
    flags = {"copy": ["-a"], "hardlink": ["-al"], "reflink": ["-a", "--reflink=always"]}[mode]
    start = time.monotonic()
    run(["cp", *flags, src, dst])
    return time.monotonic() - start


def sync_fs(path: Path) -> None:
    """Flush so statvfs shows real usage (btrfs commits lazily)."""
    run(["sync", "-f", path])


ZERO_COPY_MODE = {"btrfs": "reflink", "xfs": "reflink", "ext4": "hardlink"}


@dataclass
class BaselineCopy:
    mode: str  # "reflink" (cp -a --reflink=always) or "hardlink" (cp -al)
    seconds: float
    extra_bytes: int  # statvfs used after - before, synced


def zero_copy_baseline(fs: LoopFs, trees: list[Path]) -> BaselineCopy:
    """The filesystem's own zero-copy copy of `trees` (timed, and its extra disk use measured),
    removed again afterwards: the yardstick for an import of the same trees."""
    mode = ZERO_COPY_MODE[fs.kind]
    sync_fs(fs.path)
    used = fs.statvfs_used_bytes()
    targets = [fs.path / f".baseline-{i}" for i in range(len(trees))]
    seconds = sum(copy_tree(tree, target, mode) for tree, target in zip(trees, targets, strict=True))
    sync_fs(fs.path)
    extra = fs.statvfs_used_bytes() - used
    for target in targets:
        shutil.rmtree(target)
    sync_fs(fs.path)
    return BaselineCopy(mode, seconds, extra)
