"""pytest plugin of our own tests (`-p testsupport.plugin`, in pyproject's addopts): loop
filesystems that always get cleaned up, the storage tier's sysroot and bootc store, the small test
images, and `run_cli`. The qualification product's options (`--fs`, `--scenarios`), `require()`
and the `registry` fixture stay in harness.pytest_plugin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from harness.loopfs import LoopFs, missing_prerequisites
from harness.pytest_plugin import require
from harness.registry import Registry
from harness.testimages import TestImages, build_and_push
from harness.testimages import missing_prerequisites as testimages_missing

if TYPE_CHECKING:
    from bootc_unified.imgstore import ImageStore

LoopFsFactory = Callable[..., LoopFs]


@pytest.fixture
def loopfs_factory(tmp_path: Path) -> Iterator[LoopFsFactory]:
    """Make loop filesystems on demand: factory(kind, name=None, size=...). All unmounted at teardown."""
    made: list[LoopFs] = []
    counter = iter(range(1_000_000))

    def factory(kind: str, name: str | None = None, size: int | None = None) -> LoopFs:
        require(missing_prerequisites((kind,)), f"a loop {kind} filesystem")
        fs = LoopFs.create(
            kind,
            tmp_path / "loopfs",
            name=name or f"{kind}{next(counter)}",
            **({"size": size} if size else {}),
        )
        made.append(fs)
        return fs

    yield factory
    errors = []
    for fs in reversed(made):
        try:
            fs.close()
        except Exception as e:  # keep cleaning the rest
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def loopfs(fs_kind: str, loopfs_factory: LoopFsFactory) -> LoopFs:
    """A fresh, mounted loop filesystem of the parametrized kind."""
    return loopfs_factory(fs_kind)


CLI = [sys.executable, "-m", "bootc_unified"]


def run_cli(
    *args: str | os.PathLike[str], check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `bootc-unified ARGS...` from this interpreter's environment, capturing text output."""
    proc = subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"bootc-unified {' '.join(map(str, args))} failed: {proc.stderr.strip()}")
    return proc


@pytest.fixture(scope="session")
def test_images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> TestImages:
    """The images of images/testimages/, built with buildah and pushed (gzip and zstd) to `registry`."""
    require(testimages_missing(), "building test images")
    return build_and_push(registry.address, tmp_path_factory.mktemp("testimages"))


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    return [p for p in points if p.startswith(f"{path}/") or p == str(path)]


@pytest.fixture
def sysroot(loopfs: LoopFs) -> Iterator[Path]:
    """An empty sysroot on the parametrized loop filesystem; afterwards, podman must have left no
    mounts in its bootc image store (they are cleaned up either way)."""
    from bootc_unified.imgstore import STORE_SUBPATH, ImageStore

    require([] if shutil.which("podman") else ["podman not found"], "the bootc image store")
    root = loopfs.path / "sysroot"
    root.mkdir()
    yield root
    store = ImageStore(root / STORE_SUBPATH)
    leaked = mounts_under(store.root)
    store.cleanup_runtime()
    assert not leaked, f"podman left mounts in the bootc store: {leaked}"


@pytest.fixture
def bootc_store(sysroot: Path) -> ImageStore:
    """The bootc-owned containers-storage under `sysroot`, created."""
    from bootc_unified.imgstore import ImageStore

    return ImageStore.ensure(sysroot)
