"""Add every regular file of a tree to a repository, in parallel, and the floor such an add (or an
image import) is measured against; used by the demo and bench/."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bootc_unified.digestpool import DigestPool
from bootc_unified.repository import Repository
from bootc_unified.repository.stats import ImportStats
from bootc_unified.verity import HashAlg
from harness.loopfs import LoopFs
from harness.run import run


def regular_files(root: Path) -> Iterator[Path]:
    for path in regular_file_paths(os.fsencode(root)):
        yield Path(os.fsdecode(path))


def regular_file_paths(root: bytes) -> Iterator[bytes]:
    """Every regular file under `root` (not following symlinks), by the directory entries' types
    (no stat per file where the filesystem reports d_type)."""
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    yield entry.path


@dataclass
class TreeAdd:
    stats: ImportStats
    seconds: float


def add_tree(repo: Repository, root: Path, zerocopy: bool = False, workers: int | None = None) -> TreeAdd:
    """ensure_object_from_file for each file.

    An insecure repository's digests are computed by a DigestPool (`workers` processes) while this
    thread links; with fs-verity the kernel hashes in the ioctls, which drop the GIL, so `workers`
    threads add the files.
    """
    stats = ImportStats()
    start = time.monotonic()
    with repo.writer_lock():
        if repo.insecure:
            paths = list(regular_file_paths(os.fsencode(root)))
            with DigestPool(repo.alg, workers) as pool:
                for path, digest in zip(paths, pool.map((p, None) for p in paths), strict=True):
                    stats.record(repo.ensure_object_from_file(path, zerocopy=zerocopy, digest=digest))
        else:
            with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as threads:
                for result in threads.map(
                    lambda p: repo.ensure_object_from_file(p, zerocopy=zerocopy),
                    regular_file_paths(os.fsencode(root)),
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


def drop_caches() -> None:
    """Write back and drop the page, dentry and inode caches: the next read comes from the disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _timed_shell(script: str) -> float:
    start = time.monotonic()
    subprocess.run(["sh", "-c", script], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def digest_seconds(trees: list[Path], alg: HashAlg) -> float:
    """`fsverity digest` (fsverity-utils, C) of every regular file of `trees`, one process at a
    time as the tool is used: the cost of reading and hashing each byte once."""
    files = " ".join(shlex.quote(str(t)) for t in trees)
    return _timed_shell(
        f"find {files} -type f -print0 | xargs -0 fsverity digest --hash-alg={alg.label} --block-size=4096"
    )


def sha256_seconds(trees: list[Path]) -> float:
    """One sha256 (OpenSSL through hashlib, SHA-NI where the CPU has it; coreutils' sha256sum is 5x
    slower here) over the contents of every regular file of `trees`: the DiffID hash of the layers'
    file bytes (headers, a few percent more, not included)."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    start = time.monotonic()
    sha = hashlib.sha256()
    for tree in trees:
        for path in regular_file_paths(os.fsencode(tree)):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                while n := os.readv(fd, [buf]):
                    sha.update(view[:n])
            finally:
                os.close(fd)
    return time.monotonic() - start


@dataclass
class Floor:
    """The floor of a zero-copy import of `trees`: link each file once (the filesystem's zero-copy
    `cp`), read and hash each byte once (`fsverity digest`), and for an image the DiffID hash."""

    mode: str
    copy_s: float
    digest_s: float
    sha256_s: float  # 0 for a tree add (no layer stream to check)
    copy_extra_bytes: int

    @property
    def seconds(self) -> float:
        return self.copy_s + self.digest_s + self.sha256_s

    def parts(self) -> str:
        sha = f" + sha256 {self.sha256_s:.2f}" if self.sha256_s else ""
        return f"{self.mode} {self.copy_s:.2f} + digest {self.digest_s:.2f}{sha}"


def measure_floor(fs: LoopFs, trees: list[Path], alg: HashAlg, cold: bool, diffid: bool) -> Floor:
    """Floor of `trees` on `fs`; `cold`: caches dropped before the copy and before the digest (the
    two first reads of the metadata and of the data); the sha256 follows the digest, as one pass
    would read the data once for both."""
    if cold:
        drop_caches()
    copy = zero_copy_baseline(fs, trees)
    if cold:
        drop_caches()
    digest = digest_seconds(trees, alg)
    sha = sha256_seconds(trees) if diffid else 0.0
    return Floor(copy.mode, copy.seconds, digest, sha, copy.extra_bytes)
