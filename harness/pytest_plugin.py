"""The qualification product's pytest plugin: the `--fs` and `--scenarios` selection (`fs_kind`
parametrization, @pytest.mark.fs / @pytest.mark.sample), `require()`, the session's build-cache
prune and the local `registry` the VM scenarios push their images to. The fixtures only our own
storage tests use (loop filesystems, sysroot, bootc store, test images, `run_cli`) are in
testsupport.plugin.

In CI (`CI=true`) a missing prerequisite fails the test; elsewhere it skips with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from harness.loopfs import KINDS
from harness.registry import Registry
from harness.registry import missing_prerequisites as registry_missing


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


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With `--scenarios sample`, @pytest.mark.qualification_only tests deselected (reported as
    such). Then longest first: the VM scenarios' tests ordered by their expected wall time (the
    scenario registry's, shared among a scenario's test functions), ahead of everything else in
    collection order. With -n N and `--dist load --maxschedchunk 1` (ci/test,
    bootc-unified-qualify) each worker takes the next test when it finishes one, so the long
    scenarios start at once and the short tests fill the end (a 30-minute scenario started last
    would run alone). Every worker collects the same, so every worker sorts the same."""
    from harness.qualify.scenarios import owner

    if config.getoption("--scenarios") == "sample":
        dropped = [i for i in items if i.get_closest_marker("qualification_only") is not None]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [i for i in items if i not in dropped]

    def expected(item: pytest.Item) -> float:
        scenario = owner(item.nodeid)
        return scenario.expected_seconds / len(scenario.nodes) if scenario is not None else 0.0

    items.sort(key=expected, reverse=True)  # stable: equal times keep collection order


# --- the local registry (session-scoped, one per xdist worker) ---------------------------------


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A docker-registry on 127.0.0.1:<free port> with storage in a temporary directory."""
    require(registry_missing(), "a local registry")
    with Registry.start(tmp_path_factory.mktemp("registry")) as reg:
        yield reg
