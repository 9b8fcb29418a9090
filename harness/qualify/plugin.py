"""pytest plugin of the qualification run (`-p harness.qualify.plugin --qualify-events FILE`).

Where the tests run (a pytest-xdist worker, or the one process without -n):
- before a failed test's VMs are torn down, each running guest's `bootc-unified status --format
  json` is saved as `status-<vm>.json` in the test's artifacts directory (the report links it);
- the teardown report carries what the report needs from the machines (the `qualify` user
  property: filesystem, artifacts directory, boot-to-SSH and reboot seconds, backends), which
  pytest-xdist ships to the controller with the report.

In the controller (pytest's main process): every collection, test start and phase report goes to
FILE as one JSON line (harness.qualify.events), which `bootc-unified-qualify` tails for its live
progress and reads for results.json. Without --qualify-events the plugin does nothing.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness.qualify import events
from harness.qualify.scenarios import fs_of

if TYPE_CHECKING:
    from harness.vm import Machine

PROPERTY = "qualify"
STATUS_TIMEOUT = 120.0  # seconds for `status` in a guest that may be in trouble
_CALL_FAILED = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bootc-unified qualification")
    group.addoption("--qualify-events", default=None, help="append the run's events to FILE (JSON lines)")


def _events(config: pytest.Config) -> Path | None:
    value = config.getoption("--qualify-events", default=None)
    return Path(value) if value else None


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


def artifacts_path(root: Path, nodeid: str) -> Path:
    """A test's VM artifacts directory under `root`, as harness.pytest_vm.artifacts_dir names it."""
    from harness.pytest_vm import slug

    return root / slug(nodeid)


def artifacts_dir(config: pytest.Config, nodeid: str) -> Path:
    option = config.getoption("--vm-artifacts", default=None)
    return artifacts_path(Path(option) if option else Path(config.rootpath) / "artifacts" / "vm", nodeid)


def _machines(item: pytest.Item) -> list[Machine]:
    from harness.pytest_vm import MACHINES

    machines: list[Machine] = item.stash.get(MACHINES, [])
    return list(machines)


# --- where the tests run ---------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if _events(item.config) is None:
        return report
    if report.when == "call" and report.failed:
        item.stash[_CALL_FAILED] = True
    if report.when == "teardown":
        machines = _machines(item)
        params = getattr(item, "callspec", None)
        fs = params.params.get("fs_kind") if params is not None else None
        report.user_properties.append(
            (
                PROPERTY,
                {
                    "fs": fs if isinstance(fs, str) else fs_of(item.nodeid),
                    "artifacts": str(artifacts_dir(item.config, item.nodeid)),
                    "machines": [
                        {
                            "name": m.spec.name,
                            "backend": m.backend,
                            "accel": m.spec.accel.name,
                            "boots": m.boots,
                            "boots_to_ssh": [round(s, 1) for s in m.timings.boots_to_ssh],
                            "reboots": [round(s, 1) for s in m.timings.reboots],
                        }
                        for m in machines
                    ],
                },
            )
        )
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    """Before the fixtures destroy the VMs: a failed test's guests' status JSON, best effort."""
    if _events(item.config) is not None and item.stash.get(_CALL_FAILED, False):
        save_status(item)
    return (yield)


def save_status(item: pytest.Item) -> None:
    directory = artifacts_dir(item.config, item.nodeid)
    for machine in _machines(item):
        try:
            if not (machine.is_running() and machine.ssh.connected):
                continue
            got = machine.ssh.run(
                ["bootc-unified", "status", "--format", "json"], timeout=STATUS_TIMEOUT, check=False
            )
            text = got.stdout if got.ok else json.dumps({"error": got.stderr.strip()[-2000:]})
        except Exception as e:  # evidence is best effort; the test's own failure stands
            text = json.dumps({"error": f"{type(e).__name__}: {e}"})
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"status-{machine.spec.name}.json").write_text(text)


# --- the controller: events ---------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    path = _events(config)
    if path is not None and _is_controller(config):
        config.pluginmanager.register(EventWriter(path), "bootc-unified-qualify-events")


def message(report: pytest.TestReport) -> str | None:
    """The assertion (or error) of a failed phase; the reason of a skip."""
    if report.passed:
        return None
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, reason)
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None and getattr(crash, "message", None):
        return str(crash.message)
    text = report.longreprtext.strip()
    return text.splitlines()[-1] if text else None


class EventWriter:
    """Hooks of the controller process; each writes one event line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if session.items:  # without pytest-xdist; with it, the workers collect
            events.emit(self.path, "collected", nodeids=[i.nodeid for i in session.items])

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        events.emit(self.path, "collected", nodeids=list(ids))

    def pytest_runtest_logstart(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        events.emit(self.path, "start", nodeid=nodeid)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = {k: v for k, v in report.user_properties if k == PROPERTY}
        node = getattr(report, "node", None)  # pytest-xdist: the worker it came from
        worker = getattr(getattr(node, "gateway", None), "id", None)
        events.emit(
            self.path,
            "phase",
            nodeid=report.nodeid,
            when=report.when,
            outcome=report.outcome,
            duration=round(report.duration, 2),
            message=message(report),
            longrepr=report.longreprtext[-8000:] if report.failed else None,
            worker=worker,
            props=props.get(PROPERTY),
        )

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        events.emit(self.path, "finish", exitstatus=int(exitstatus))
