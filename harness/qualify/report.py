"""report.html: one self-contained page (inline CSS and SVG, no script, no external resource)
rendered with jinja2 from results.json's model (harness.qualify.results), never from pytest output.

Sections: the filesystem x scenario matrix (outcome, wall time, boots, P5), boot and reboot times,
per filesystem a bar chart of the disk figures the step records give ("not measured" for the
rest; per scenario that measures them: image bytes, bootc store, repository extra and what a
plain copy would cost, each in its colour), and per failure the phase and step, the assertion,
links to the evidence (relative paths into the output directory: console log, journal, status
JSON, domain XML or QEMU command line) and a command that reproduces just that scenario.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2

from harness.qualify.results import DiskMetric, Result, Results
from harness.qualify.scenarios import BY_NAME, SCENARIOS

CHART_WIDTH = 720
LABEL_WIDTH = 330
BAR_HEIGHT = 18
BAR_GAP = 8


# bar colour by the figure's kind (results.DiskMetric.kind); the rest DEFAULT_COLOR
COLORS = {
    "image_bytes": "#8a8a8a",
    "bootc_store_bytes": "#4a7fc1",
    "repository_extra_bytes": "#2e9e5b",
    "plain_copy_bytes": "#c4603b",
}
DEFAULT_COLOR = "#6f8fb8"


@dataclass(frozen=True)
class Bar:
    label: str
    value: str  # "757 MB" or "not measured"
    source: str
    y: int
    width: int  # 0 when not measured
    color: str


@dataclass(frozen=True)
class Chart:
    fs: str
    width: int
    height: int
    label_width: int
    bars: list[Bar]


def human_bytes(n: int | None) -> str:
    if n is None:
        return "not measured"
    return f"{n / 1e6:,.1f} MB" if abs(n) < 10e9 else f"{n / 1e9:,.2f} GB"


def minutes(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def chart(fs: str, metrics: list[DiskMetric]) -> Chart:
    top = max((m.bytes for m in metrics if m.bytes is not None and m.bytes > 0), default=0)
    span = CHART_WIDTH - LABEL_WIDTH - 110  # room for the value after the bar
    bars = []
    for i, m in enumerate(metrics):
        width = round(span * m.bytes / top) if (m.bytes is not None and m.bytes > 0 and top) else 0
        y = i * (BAR_HEIGHT + BAR_GAP)
        color = COLORS.get(m.kind, DEFAULT_COLOR)
        bars.append(Bar(m.label, human_bytes(m.bytes), m.source, y, max(width, 0), color))
    return Chart(fs, CHART_WIDTH, len(bars) * (BAR_HEIGHT + BAR_GAP), LABEL_WIDTH, bars)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("harness.qualify", "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["minutes"] = minutes
    env.filters["human_bytes"] = human_bytes
    return env


def render(results: Results) -> str:
    filesystems = [fs for fs in results.run.filesystems if any(r.fs == fs for r in results.results)]
    filesystems += sorted({r.fs for r in results.results if r.fs and r.fs not in filesystems})
    if any(r.fs is None for r in results.results):
        filesystems.append("any")
    names = [s.name for s in SCENARIOS if any(r.scenario == s.name for r in results.results)]
    cells: dict[tuple[str, str], Result] = {(r.scenario, r.fs or "any"): r for r in results.results}
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            results=results,
            run=results.run,
            filesystems=filesystems,
            scenarios=[BY_NAME[n] for n in names],
            cells=cells,
            failures=results.failed(),
            charts=[chart(fs, results.disk[fs]) for fs in filesystems if fs in results.disk],
            boot_times=results.boot_times,
            bar_height=BAR_HEIGHT,
        )
    )


def write(results: Results, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render(results))
    tmp.replace(path)
