"""Live progress of a qualification run, from the plugin's events and the step records the
scenarios write while they run (`*-steps.json`, rewritten after every step).

On a terminal: a rich Live table (scenario, filesystem, state, worker, last step, elapsed,
expected) under a header with the run's elapsed and expected time. Elsewhere (CI logs): one line
per change (a test starts, finishes, or records a step).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from harness.qualify.plugin import artifacts_path
from harness.qualify.scenarios import fs_of, owner

STYLE = {"passed": "green", "failed": "red", "error": "red", "skipped": "yellow", "running": "cyan"}


def clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


@dataclass
class Test:
    nodeid: str
    scenario: str
    fs: str
    expected: float
    state: str = "queued"  # queued, running, passed, failed, error, skipped
    phase: str = ""
    worker: str = ""
    started: float | None = None
    ended: float | None = None
    steps: int = 0
    last_step: str = ""

    def elapsed(self, now: float) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or now) - self.started


@dataclass
class Progress:
    artifacts_root: Path
    workers: int
    console: Console
    started: float = field(default_factory=time.time)
    tests: dict[str, Test] = field(default_factory=dict)

    def _test(self, nodeid: str) -> Test | None:
        if nodeid not in self.tests:
            scenario = owner(nodeid)
            if scenario is None:
                return None
            fs = fs_of(nodeid) or "any"
            self.tests[nodeid] = Test(nodeid, scenario.name, fs, scenario.expected_seconds)
        return self.tests[nodeid]

    def feed(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind = event["event"]
            if kind == "collected":
                for nodeid in event["nodeids"]:
                    self._test(nodeid)
                continue
            test = self._test(event.get("nodeid", ""))
            if test is None:
                continue
            if kind == "start" and test.started is None:
                test.started, test.state, test.phase = event["t"], "running", "setup"
                self._say(f"start  {self.label(test)} (expected ~{clock(test.expected)})")
            elif kind == "phase":
                test.worker = event.get("worker") or test.worker
                if event["outcome"] != "passed" or event["when"] == "teardown":
                    self._finish(test, event)
                elif event["when"] == "setup":
                    test.phase = "call"

    def _finish(self, test: Test, event: dict[str, Any]) -> None:
        if test.state in ("failed", "error", "skipped") and event["when"] == "teardown":
            return  # already final; teardown of a failed test
        outcome = event["outcome"]
        if outcome == "failed":
            test.state = "failed" if event["when"] == "call" else "error"
        elif outcome == "skipped":
            test.state = "skipped"
        else:
            test.state = "passed"
        test.ended = event["t"]
        why = f": {event.get('message')}" if event.get("message") else ""
        self._say(f"{test.state:<6} {self.label(test)} in {clock(test.elapsed(test.ended))}{why[:200]}")

    def poll_steps(self) -> None:
        """Pick up the step records of running tests."""
        for test in self.tests.values():
            if test.state != "running":
                continue
            records: list[dict[str, Any]] = []
            for path in sorted(artifacts_path(self.artifacts_root, test.nodeid).glob("*-steps.json")):
                try:
                    records += json.loads(path.read_text()).get("steps", [])
                except (OSError, ValueError):
                    continue  # being replaced right now
            if len(records) > test.steps:
                test.steps, test.last_step = len(records), str(records[-1].get("name", ""))
                self._say(f"step   {self.label(test)}: {test.last_step} ({records[-1].get('seconds')} s)")

    def label(self, test: Test) -> str:
        return f"{test.scenario}[{test.fs}]"

    def _say(self, line: str) -> None:
        if not self.console.is_terminal:
            self.console.print(f"[{clock(time.time() - self.started)}] {line}", highlight=False, markup=False)

    def expected_total(self) -> float:
        return sum(t.expected for t in self.tests.values()) / max(1, self.workers)

    def render(self) -> RenderableType:
        now = time.time()
        done = sum(1 for t in self.tests.values() if t.state not in ("queued", "running"))
        header = Text(
            f"qualification: {done}/{len(self.tests)} done, elapsed {clock(now - self.started)}"
            f" of ~{clock(self.expected_total())} expected (TCG figures, {self.workers} parallel VM(s))"
        )
        table = Table(expand=False)
        for column in ("scenario", "fs", "state", "worker", "last step", "elapsed", "expected"):
            table.add_column(column)
        for t in self.tests.values():
            state = t.state if t.state != "running" else f"running ({t.phase})"
            table.add_row(
                t.scenario,
                t.fs,
                Text(state, style=STYLE.get(t.state, "")),
                t.worker,
                t.last_step,
                clock(t.elapsed(now)),
                clock(t.expected),
            )
        return Group(header, table)
