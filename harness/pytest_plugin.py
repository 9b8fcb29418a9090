"""pytest plugin: tiers, the `--fs` selection, loop filesystems that always get cleaned up.

In CI (`CI=true`) a missing prerequisite fails the test; elsewhere it skips with the reason.
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

from harness.loopfs import KINDS, LoopFs, missing_prerequisites

if TYPE_CHECKING:
    from bootc_unified.imgstore import ImageStore
from harness.registry import Registry
from harness.registry import missing_prerequisites as registry_missing
from harness.testimages import TestImages, build_and_push
from harness.testimages import missing_prerequisites as testimages_missing


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(problems: list[str], what: str) -> None:
    """Fail (CI) or skip (elsewhere) when `problems` is not empty."""
    if not problems:
        return
    message = f"{what} needs: {'; '.join(problems)}"
    if in_ci():
        pytest.fail(f"prerequisite missing in CI: {message}", pytrace=False)
    pytest.skip(message)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Once per run (the controller, not each xdist worker): drop stale build-cache entries."""
    if not hasattr(session.config, "workerinput"):
        from harness import cache

        removed = cache.prune()
        if removed:
            print(f"build cache: pruned {len(removed)} stale entries under {cache.cache_dir()}")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bootc-unified")
    group.addoption(
        "--fs",
        default=",".join(KINDS),
        help=f"comma-separated loop filesystems to run on (default: {','.join(KINDS)})",
    )
    group.addoption(
        "--scenarios",
        choices=["all", "sample"],
        default="all",
        help="sample: long scenarios marked @pytest.mark.sample(fs) run on that filesystem only "
        "(what ci/test runs to fit CI; the qualification runs all)",
    )


def selected_kinds(config: pytest.Config) -> list[str]:
    kinds = [k.strip() for k in str(config.getoption("--fs")).split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise pytest.UsageError(f"--fs: unknown filesystem {', '.join(unknown)}; choose from {KINDS}")
    return kinds


def check_fs_marker(nodeid: str, marker: pytest.Mark) -> None:
    """A misspelt @pytest.mark.fs(...) fails collection instead of quietly deselecting the test."""
    unknown = [repr(a) for a in marker.args if a not in KINDS]
    if not marker.args or unknown or marker.kwargs:
        what = f"unknown filesystem {', '.join(unknown)}" if unknown else "expects filesystem names"
        # a collection error for this module (pytest exits non-zero), reported in one line
        pytest.fail(
            f"{nodeid}: @pytest.mark.{marker.name}: {what}; choose from {', '.join(KINDS)}", pytrace=False
        )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize `fs_kind` over the selected filesystems, narrowed by @pytest.mark.fs(...) and,
    with `--scenarios sample`, by @pytest.mark.sample(...)."""
    marker = metafunc.definition.get_closest_marker("fs")
    if marker is not None:
        check_fs_marker(metafunc.definition.nodeid, marker)
    sample = metafunc.definition.get_closest_marker("sample")
    if sample is not None:
        check_fs_marker(metafunc.definition.nodeid, sample)
    if "fs_kind" not in metafunc.fixturenames:
        return
    kinds = selected_kinds(metafunc.config)
    if marker is not None:
        kinds = [k for k in kinds if k in marker.args]
    if sample is not None and metafunc.config.getoption("--scenarios") == "sample":
        kinds = [k for k in kinds if k in sample.args]
    metafunc.parametrize("fs_kind", kinds)


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


# --- local registry and test images (session-scoped, one per xdist worker) ---------------------


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A docker-registry on 127.0.0.1:<free port> with storage in a temporary directory."""
    require(registry_missing(), "a local registry")
    with Registry.start(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


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
