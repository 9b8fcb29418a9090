"""results.json: the qualification run's results, per filesystem x scenario, built from the
plugin's events (harness.qualify.events) and what the tests left in their artifacts directories.

Per test: outcome and wall time (pytest's setup + call + teardown durations), boots (kernel banners
in its console logs: harness.vm.console, the same count the console check holds every VM to), the
machines' boot-to-SSH and reboot seconds, the scenario's step records (`*-steps.json`, written by
harness.lifecycle.Steps: per step wall seconds, boots, disk used, facts) and `timings.json` where
the scenario writes them, the evidence files (relative to the output directory), the failure, and
P5 = wall / (boots x bare boot-to-SSH), the bare boot measured by this run's smoke scenario on the
same filesystem (a run without smoke there, e.g. a user's images in the update scenario: the median
of the run's boots to SSH on that filesystem). Per filesystem: the disk-use figures the step
records give (per scenario that measures them: image bytes, bootc store, repository extra, plain
copy cost; "not measured" = None). The HTML report renders this document and nothing else.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.qualify.plugin import artifacts_path
from harness.qualify.scenarios import FILESYSTEMS, SCENARIOS, fs_of, owner
from harness.vm import console

VERSION = 1
NOT_RUN = "not run"
EXIT_PASSED, EXIT_FAILED, EXIT_USAGE, EXIT_INFRA = 0, 1, 2, 3


@dataclass(frozen=True)
class Machine:
    name: str
    backend: str
    accel: str
    boots: int
    boots_to_ssh: list[float]
    reboots: list[float]


@dataclass(frozen=True)
class Files:
    """Evidence, as paths relative to the output directory."""

    artifacts: str | None = None
    console: list[str] = field(default_factory=list)
    journal: list[str] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    definition: list[str] = field(default_factory=list)  # domain XML or QEMU command line
    steps: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Failure:
    phase: str  # setup (VM start, install, images), call (the scenario), teardown (console checks)
    step: str | None  # the last step the scenario recorded before it failed
    message: str
    details: str


@dataclass(frozen=True)
class Result:
    scenario: str
    fs: str | None
    nodeid: str
    outcome: str  # passed, failed, error (setup/teardown), skipped, not run
    wall_seconds: float
    phases: dict[str, float]
    boots: int | None
    machines: list[Machine]
    steps: list[dict[str, Any]]
    timings: dict[str, Any]
    files: Files
    failure: Failure | None
    skip_reason: str | None
    p5: float | None
    reproduce: str


@dataclass(frozen=True)
class DiskMetric:
    label: str
    bytes: int | None  # None: not measured by this run
    source: str  # which scenario step and fact it comes from
    kind: str = ""  # the fact's key (image_bytes, bootc_store_bytes, ...): the chart colours by it


@dataclass(frozen=True)
class BootTimes:
    bare_boot_to_ssh: float | None  # smoke's first boot
    reboot_to_ssh: float | None  # smoke's reboot
    soft_reboot_to_ssh: float | None
    boots_to_ssh_median: float | None  # every VM start of the run on this filesystem
    reboots_median: float | None
    boots_measured: int


@dataclass(frozen=True)
class RunInfo:
    started: str
    finished: str
    wall_seconds: float
    command: list[str]
    pytest_command: list[str]
    pytest_exit: int
    filesystems: list[str]
    scenarios: list[str]
    backend: str
    workers: int
    images: dict[str, str] = field(default_factory=dict)  # variant -> a user's image standing in


@dataclass(frozen=True)
class Results:
    version: int
    run: RunInfo
    exit_status: int
    results: list[Result]
    boot_times: dict[str, BootTimes]
    disk: dict[str, list[DiskMetric]]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Results:
        doc = json.loads(text)
        if doc.get("version") != VERSION:
            raise ValueError(f"results.json version {doc.get('version')!r}; this reads version {VERSION}")
        results = [
            Result(
                **{
                    **r,
                    "machines": [Machine(**m) for m in r["machines"]],
                    "files": Files(**r["files"]),
                    "failure": Failure(**r["failure"]) if r["failure"] else None,
                }
            )
            for r in doc["results"]
        ]
        return cls(
            version=doc["version"],
            run=RunInfo(**doc["run"]),
            exit_status=doc["exit_status"],
            results=results,
            boot_times={fs: BootTimes(**b) for fs, b in doc["boot_times"].items()},
            disk={fs: [DiskMetric(**m) for m in ms] for fs, ms in doc["disk"].items()},
        )

    def failed(self) -> list[Result]:
        return [r for r in self.results if r.outcome in ("failed", "error", NOT_RUN)]


# --- building ----------------------------------------------------------------------------------------


IMAGE_FLAGS = {"v1": "--image", "v2": "--update-image"}  # a user's image standing in for a variant


def reproduce_command(scenario: str, fs: str | None, images: Mapping[str, str] | None = None) -> str:
    """The command line that runs just this scenario again, on the same filesystem and images."""
    argv = ["ci/qualify", *(["--fs", fs] if fs else []), "--scenario", scenario]
    for variant, flag in IMAGE_FLAGS.items():
        if images and variant in images:
            argv += [flag, images[variant]]
    return shlex.join(argv)


def _rel(path: Path, output: Path) -> str:
    return os.path.relpath(path, output)


def collect_files(directory: Path, output: Path) -> Files:
    if not directory.is_dir():
        return Files()

    def find(*patterns: str) -> list[str]:
        found = sorted({p for pattern in patterns for p in directory.rglob(pattern) if p.is_file()})
        return [_rel(p, output) for p in found]

    return Files(
        artifacts=_rel(directory, output),
        console=find("console.log"),
        journal=find("journal.txt"),
        status=find("status*.json"),
        definition=find("domain.xml", "qemu-cmdline.txt"),
        steps=find("*-steps.json"),
    )


def count_boots(files: Files, output: Path) -> int | None:
    if not files.console:
        return None
    return sum(console.banners((output / p).read_text(errors="replace")) for p in files.console)


def load_steps(files: Files, output: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for path in files.steps:
        try:
            doc = json.loads((output / path).read_text())
        except (OSError, ValueError):
            continue
        records.extend(doc.get("steps", []))
    return records


def load_timings(directory: Path) -> dict[str, Any]:
    try:
        doc = json.loads((directory / "timings.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _outcome(phases: dict[str, dict[str, Any]]) -> str:
    if not phases:
        return NOT_RUN
    if phases.get("call", {}).get("outcome") == "failed":
        return "failed"
    if any(p["outcome"] == "failed" for p in phases.values()):
        return "error"
    if any(p["outcome"] == "skipped" for p in phases.values()):
        return "skipped"
    if "call" not in phases or "teardown" not in phases:
        return NOT_RUN  # interrupted: a worker died, or the run was stopped
    return "passed"


def _failure(phases: dict[str, dict[str, Any]], steps: list[dict[str, Any]]) -> Failure | None:
    for when in ("setup", "call", "teardown"):
        phase = phases.get(when)
        if phase is not None and phase["outcome"] == "failed":
            step = steps[-1]["name"] if steps and when == "call" else None
            return Failure(when, step, phase.get("message") or "", phase.get("longrepr") or "")
    return None


def exit_status(pytest_exit: int, got: list[Result]) -> int:
    """0 every scenario run passed; 1 one failed; 2 pytest refused its options; 3 the harness
    could not run one (skipped for a missing prerequisite, not run, nothing collected)."""
    if pytest_exit == 4:
        return EXIT_USAGE
    if any(r.outcome in ("failed", "error") for r in got):
        return EXIT_FAILED
    if pytest_exit != 0 or not got or any(r.outcome in ("skipped", NOT_RUN) for r in got):
        return EXIT_INFRA
    return EXIT_PASSED


def build(events: Iterable[dict[str, Any]], output: Path, run: RunInfo) -> Results:
    """results.json's document from the run's events and the artifacts under `output`."""
    order: list[str] = []
    phases: dict[str, dict[str, dict[str, Any]]] = {}
    props: dict[str, dict[str, Any]] = {}
    for event in events:
        ids = event.get("nodeids") or ([event["nodeid"]] if "nodeid" in event else [])
        order.extend(i for i in ids if i not in order)
        if event["event"] == "phase":
            phases.setdefault(event["nodeid"], {})[event["when"]] = event
            if event.get("props"):
                props[event["nodeid"]] = event["props"]

    partial: list[Result] = []
    for nodeid in order:
        scenario = owner(nodeid)
        if scenario is None:
            continue
        prop = props.get(nodeid, {})
        directory = (
            Path(prop["artifacts"]) if prop.get("artifacts") else artifacts_path(output / "artifacts", nodeid)
        )
        files = collect_files(directory, output)
        steps = load_steps(files, output)
        got = phases.get(nodeid, {})
        outcome = _outcome(got)
        skip = next((p.get("message") for p in got.values() if p["outcome"] == "skipped"), None)
        partial.append(
            Result(
                scenario=scenario.name,
                fs=prop.get("fs") or fs_of(nodeid),
                nodeid=nodeid,
                outcome=outcome,
                wall_seconds=round(sum(p["duration"] for p in got.values()), 1),
                phases={w: p["duration"] for w, p in got.items()},
                boots=count_boots(files, output),
                machines=[Machine(**m) for m in prop.get("machines", [])],
                steps=steps,
                timings=load_timings(directory),
                files=files,
                failure=_failure(got, steps),
                skip_reason=skip,
                p5=None,
                reproduce=reproduce_command(scenario.name, prop.get("fs") or fs_of(nodeid), run.images),
            )
        )
    boot_times = {fs: _boot_times(fs, partial) for fs in FILESYSTEMS if any(r.fs == fs for r in partial)}
    results = [
        _with_p5(r, boot_times[r.fs].bare_boot_to_ssh if r.fs in boot_times else None) for r in partial
    ]
    disk = {fs: disk_use([r for r in results if r.fs == fs]) for fs in boot_times}
    return Results(VERSION, run, exit_status(run.pytest_exit, results), results, boot_times, disk)


def _with_p5(result: Result, bare: float | None) -> Result:
    if bare is None or not result.boots or result.outcome != "passed":
        return result
    return replace(result, p5=round(result.wall_seconds / (result.boots * bare), 2))


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def _number(value: Any) -> float | None:
    return round(float(value), 1) if isinstance(value, (int, float)) and value > 0 else None


def _boot_times(fs: str, results: list[Result]) -> BootTimes:
    smoke = next((r for r in results if r.scenario == "smoke" and r.fs == fs and r.outcome == "passed"), None)
    timings = smoke.timings if smoke else {}
    bare = _number(timings.get("boot_to_ssh"))
    if bare is None and smoke and smoke.machines and smoke.machines[0].boots_to_ssh:
        bare = smoke.machines[0].boots_to_ssh[0]
    boots = [s for r in results if r.fs == fs for m in r.machines for s in m.boots_to_ssh]
    reboots = [s for r in results if r.fs == fs for m in r.machines for s in m.reboots]
    if bare is None:
        bare = _median(boots)
    return BootTimes(
        bare_boot_to_ssh=bare,
        reboot_to_ssh=_number(timings.get("reboot_to_ssh")),
        soft_reboot_to_ssh=_number(timings.get("soft_reboot_to_ssh")),
        boots_to_ssh_median=_median(boots),
        reboots_median=_median(reboots),
        boots_measured=len(boots),
    )


# The figures a scenario measures into a step's facts (harness.lifecycle.disk_figures: install,
# set-unified and lifecycle do), in the order the report draws them: (label, the fact's key).
FIGURES: tuple[tuple[str, str], ...] = (
    ("image bytes", "image_bytes"),
    ("bootc store", "bootc_store_bytes"),
    ("repository extra", "repository_extra_bytes"),
    ("plain copy cost", "plain_copy_bytes"),
)
# Figures one scenario records under its own key: (label, scenario, the fact's key).
SCENARIO_FACTS: tuple[tuple[str, str, str], ...] = (
    ("second store's extra (set-unified: root fs growth)", "set-unified", "added"),
    ("freed by GC of v1 (lifecycle)", "lifecycle", "du_drop"),
)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _fact(results: list[Result], scenario: str, key: str) -> tuple[int, str] | None:
    for r in results:
        if r.scenario != scenario:
            continue
        for step in r.steps:
            value = _int(step.get("facts", {}).get(key))
            if value is not None:
                return value, f"{r.scenario}: step '{step.get('name')}', {key}"
    return None


def figures_step(result: Result) -> dict[str, Any] | None:
    """The scenario's last step whose facts carry any of FIGURES."""
    found = [s for s in result.steps if any(_int(s.get("facts", {}).get(k)) is not None for _, k in FIGURES)]
    return found[-1] if found else None


def disk_use(results: list[Result]) -> list[DiskMetric]:
    """One filesystem's disk figures from its scenarios' step records: FIGURES per scenario that
    measured them (its last such step), or once as "not measured"; SCENARIO_FACTS; the root
    filesystem's used bytes after each scenario's last step."""
    order = {s.name: i for i, s in enumerate(SCENARIOS)}
    metrics = []
    for r in sorted(results, key=lambda r: order.get(r.scenario, len(order))):
        step = figures_step(r)
        if step is None:
            continue
        for label, key in FIGURES:
            metrics.append(
                DiskMetric(
                    f"{r.scenario}: {label}",
                    _int(step.get("facts", {}).get(key)),
                    f"{r.scenario}: step '{step.get('name')}', {key}",
                    kind=key,
                )
            )
    if not metrics:
        where = "install, set-unified or lifecycle: a step fact"
        metrics = [DiskMetric(label, None, f"{where} {key}", kind=key) for label, key in FIGURES]
    for label, scenario, key in SCENARIO_FACTS:
        found = _fact(results, scenario, key)
        where = f"{scenario}: a step fact {key}"
        metrics.append(
            DiskMetric(label, found[0], found[1], kind=key)
            if found
            else DiskMetric(label, None, where, kind=key)
        )
    for r in results:  # the root filesystem after each scenario's last step (df -B1 /sysroot)
        used = [s for s in r.steps if isinstance(s.get("disk_used"), int) and s["disk_used"] >= 0]
        if used:
            last = used[-1]
            metrics.append(
                DiskMetric(
                    f"root fs used after {r.scenario}",
                    last["disk_used"],
                    f"{r.scenario}: step '{last.get('name')}', disk_used (df -B1 /sysroot)",
                    kind="disk_used",
                )
            )
    return metrics
