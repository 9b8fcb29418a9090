"""The qualification's outputs, end to end without VMs: `bootc-unified-qualify` runs a small
project whose tests/vm scenarios stand in for the real ones (same node names; each writes what a
VM scenario leaves in its artifacts directory: console log, journal, domain XML, status JSON and the
real step records of a lifecycle and a set-unified run, tests/unit/fixtures/qualify/), through the
same plugin, pytest-xdist and JUnit writer. Then report.html is opened in headless Chromium.

Oracles: the browser's DOM (matrix cells, failure links, chart), the files the links name, pytest's
own junit.xml, and the step records' numbers, recomputed here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from harness.pytest_plugin import require
from harness.qualify import cli, report, results
from harness.qualify.results import Results

FIXTURES = Path(__file__).parent / "fixtures" / "qualify"
BANNER = "[    0.000000] Linux version 6.12.117+deb13-amd64 (debian-kernel@lists.debian.org) #1 SMP\n"

INI = """[pytest]
addopts = --import-mode=importlib -p harness.pytest_plugin -p harness.pytest_vm
markers =
    fs(*names): run only on these loop filesystems
    sample(*names): sampled
"""

# tests/vm/<file> -> body; `evidence(request, boots)` writes what a VM scenario leaves behind
COMMON = f"""
import json, shutil
from pathlib import Path
import pytest
from harness.pytest_vm import artifacts_dir

FIXTURES = Path({str(FIXTURES)!r})


def evidence(request, boots, definition="domain.xml"):
    d = artifacts_dir(request)
    d.mkdir(parents=True, exist_ok=True)
    (d / "console.log").write_text({BANNER!r} * boots + "[   1.0] systemd[1]: Started.\\n")
    (d / "journal.txt").write_text("-- journal --\\n")
    xml = definition == "domain.xml"
    (d / definition).write_text("<domain type='qemu'/>\\n" if xml else "qemu-system-x86_64\\n")
    return d
"""
SCENARIOS = {
    "test_smoke.py": """
def test_smoke(fs_kind, request):
    d = evidence(request, 2, "domain.xml" if fs_kind == "ext4" else "qemu-cmdline.txt")
    timings = json.loads((FIXTURES / "smoke-timings.json").read_text())
    timings["fs"] = fs_kind
    (d / "timings.json").write_text(json.dumps(timings))
""",
    "test_lifecycle.py": """
def test_lifecycle(fs_kind, request):
    d = evidence(request, 5)
    shutil.copy(FIXTURES / "lifecycle-steps.json", d / "lifecycle-steps.json")
    if fs_kind == "ext4":
        (d / "status-bootc-unified-gw0-1-0.json").write_text(json.dumps({"status": {"booted": None}}))
        assert "v1" == "v2", "booted v1 after the upgrade, expected v2"
""",
    "test_set_unified_vm.py": """
def test_set_unified_vm(fs_kind, request):
    d = evidence(request, 1)
    shutil.copy(FIXTURES / "set-unified-steps.json", d / "set-unified-steps.json")
""",
    "test_install.py": """
def test_install_to_disk(fs_kind, request):
    d = evidence(request, 2)
    if fs_kind == "ext4":  # the disk figures on one filesystem; XFS shows them "not measured"
        shutil.copy(FIXTURES / "install-steps.json", d / "install-steps.json")
""",
    "test_zstd_chunked_vm.py": """
def test_zstd_chunked_partial_pull_and_import(fs_kind):
    pytest.skip("podman >= 5.3 not found (a prerequisite)")
""",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """The stand-in project qualified on ext4 and XFS with two workers: (output, exit, console)."""
    project = tmp_path_factory.mktemp("project")
    (project / "pytest.ini").write_text(INI)
    (project / "tests" / "vm").mkdir(parents=True)
    for name, body in SCENARIOS.items():
        (project / "tests" / "vm" / name).write_text(COMMON + body)
    output = tmp_path_factory.mktemp("qualify") / "out"
    argv = ["--fs", "ext4,xfs", "--scenario", "smoke,install,lifecycle,set-unified,zstd-chunked", "-n", "2"]
    buffer = StringIO()
    console = Console(file=buffer, width=200, force_terminal=False)
    with pytest.MonkeyPatch.context() as env:  # the real build cache is not this run's to prune
        env.setenv("BOOTC_UNIFIED_CACHE", str(tmp_path_factory.mktemp("cache")))
        code = cli.main([*argv, "--output", str(output)], project=project, console=console)
    return output, code, buffer.getvalue()


@pytest.fixture(scope="module")
def doc(run: tuple[Path, int, str]) -> Results:
    return Results.from_json((run[0] / "results.json").read_text())


def by(doc: Results, scenario: str, fs: str) -> results.Result:
    return next(r for r in doc.results if (r.scenario, r.fs) == (scenario, fs))


def test_exit_status_and_live_lines(run: tuple[Path, int, str]) -> None:
    _, code, text = run
    assert code == results.EXIT_FAILED, text
    assert "start  lifecycle[ext4]" in text and "failed lifecycle[ext4]" in text, text
    assert "reproduce: ci/qualify --fs ext4 --scenario lifecycle" in text, text


def test_results_agree_with_junit(run: tuple[Path, int, str], doc: Results) -> None:
    suite = ET.parse(run[0] / "junit.xml").getroot()
    junit: dict[str, str] = {}
    for case in suite.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        junit[name] = kinds.pop() if kinds else "passed"
    assert len(junit) == len(doc.results) == 10
    mapping = {"passed": "passed", "failure": "failed", "error": "error", "skipped": "skipped"}
    for r in doc.results:
        name = r.nodeid.split("::")[-1]
        got = [v for k, v in junit.items() if k.endswith(f"::{name}")]
        assert got == [next(k for k, v in mapping.items() if v == r.outcome)], (r.nodeid, got)


def test_results_from_the_records(doc: Results) -> None:
    steps = json.loads((FIXTURES / "lifecycle-steps.json").read_text())["steps"]
    life = by(doc, "lifecycle", "ext4")
    assert life.outcome == "failed" and life.boots == 5
    assert life.failure is not None and life.failure.phase == "call"
    assert life.failure.step == steps[-1]["name"]
    assert "booted v1 after the upgrade, expected v2" in life.failure.message
    assert life.steps == steps
    assert [Path(p).name for p in life.files.status] == ["status-bootc-unified-gw0-1-0.json"]
    skipped = by(doc, "zstd-chunked", "xfs")
    assert skipped.outcome == "skipped" and "podman >= 5.3" in (skipped.skip_reason or "")
    # P5 = wall / (boots x bare boot), the bare boot from smoke's timings.json on that filesystem
    bare = json.loads((FIXTURES / "smoke-timings.json").read_text())["boot_to_ssh"]
    su = by(doc, "set-unified", "xfs")
    assert doc.boot_times["xfs"].bare_boot_to_ssh == round(bare, 1)
    assert su.p5 == round(su.wall_seconds / (1 * round(bare, 1)), 2)
    # disk: set-unified's measured growth; what no record gives is "not measured"
    added = json.loads((FIXTURES / "set-unified-steps.json").read_text())["steps"][1]["facts"]["added"]
    disk = {m.label: m.bytes for m in doc.disk["xfs"]}
    assert disk["second store's extra (set-unified: root fs growth)"] == added
    assert disk["image bytes"] is None and disk["plain copy cost"] is None
    # install's figures on ext4, from its step that measured them (harness.lifecycle.disk_figures)
    install = json.loads((FIXTURES / "install-steps.json").read_text())["steps"]
    (measured,) = [s for s in install if "bootc_store_bytes" in s["facts"]]
    ext4 = {m.label: m for m in doc.disk["ext4"]}
    for label, key in results.FIGURES:
        got = ext4[f"install: {label}"]
        assert (got.bytes, got.kind) == (measured["facts"][key], key), got
        assert f"step '{measured['name']}'" in got.source
    assert "image bytes" not in ext4  # measured: no "not measured" placeholder
    facts = measured["facts"]
    assert 0 < facts["repository_extra_bytes"] < facts["plain_copy_bytes"] // 2 < facts["bootc_store_bytes"]
    assert Results.from_json(doc.to_json()) == doc


class Dom(HTMLParser):
    """Elements of Chromium's serialized DOM: (tag, attributes, text inside)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self._open: list[tuple[str, dict[str, str], list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = (tag, {k: v or "" for k, v in attrs}, [])
        self.elements.append(element)
        if tag not in ("meta", "br", "link", "img", "input", "hr"):  # HTML void elements
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element[2].append(data)

    def find(self, tag: str, **attrs: str) -> list[tuple[str, dict[str, str], list[str]]]:
        return [
            e
            for e in self.elements
            if e[0] == tag and all(e[1].get(k.rstrip("_").replace("_", "-")) == v for k, v in attrs.items())
        ]


@pytest.fixture(scope="module")
def dom(run: tuple[Path, int, str]) -> Dom:
    browser = shutil.which("chromium")
    require([] if browser else ["chromium (Debian package chromium)"], "opening the report")
    assert browser is not None
    report = run[0] / "report.html"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "<table" in proc.stdout, proc.stderr[-2000:]
    parsed = Dom()
    parsed.feed(proc.stdout)
    return parsed


def text(element: tuple[str, dict[str, str], list[str]]) -> str:
    return " ".join("".join(element[2]).split())


def test_matrix_in_the_browser(dom: Dom) -> None:
    assert dom.find("table", id="matrix")
    want = {
        ("smoke", "ext4"): "passed",
        ("smoke", "xfs"): "passed",
        ("lifecycle", "ext4"): "failed",
        ("lifecycle", "xfs"): "passed",
        ("set-unified", "xfs"): "passed",
        ("zstd-chunked", "ext4"): "skipped",
    }
    for (scenario, fs), outcome in want.items():
        (cell,) = dom.find("td", data_scenario=scenario, data_fs=fs)
        assert outcome in cell[1]["class"].split(), cell
        assert text(cell).startswith(outcome), text(cell)
        assert ("boot(s)" in text(cell)) == (outcome != "skipped")
    (life,) = dom.find("td", data_scenario="lifecycle", data_fs="ext4")
    assert "5 boot(s)" in text(life)
    (su,) = dom.find("td", data_scenario="set-unified", data_fs="xfs")
    assert "P5" in text(su)


def test_failure_links_resolve(dom: Dom, run: tuple[Path, int, Any]) -> None:
    output = run[0]
    (failure,) = dom.find("div", id="failure-lifecycle-ext4")
    assert "booted v1 after the upgrade, expected v2" in text(failure)
    assert "ci/qualify --fs ext4 --scenario lifecycle" in text(failure)
    links = [
        e
        for e in dom.elements
        if e[0] == "a" and e[1].get("class") in ("console", "journal", "status", "definition")
    ]
    kinds = {e[1]["class"]: e[1]["href"] for e in links}
    assert set(kinds) == {"console", "journal", "status", "definition"}, kinds
    for href in kinds.values():
        assert not href.startswith(("/", "http", "file:")), href  # relative: the directory travels
        assert (output / href).is_file(), href
    assert (output / kinds["status"]).name == "status-bootc-unified-gw0-1-0.json"
    assert (output / kinds["definition"]).read_text().startswith("<domain")


def test_chart_and_self_contained(dom: Dom, run: tuple[Path, int, Any], doc: Results) -> None:
    charts = {e[1]["data-fs"]: e for e in dom.find("svg") if "data-fs" in e[1]}
    assert set(charts) == {"ext4", "xfs"}
    xfs = text(charts["xfs"])
    assert "10.6 MB" in xfs and "not measured" in xfs, xfs
    assert dom.find("rect"), "no bars drawn"
    # ext4: install's four figures drawn, each bar in its colour, longest = the largest figure
    ext4 = text(charts["ext4"])
    figures = {m.kind: m.bytes for m in doc.disk["ext4"] if m.label.startswith("install: ")}
    for label, key in results.FIGURES:
        assert f"install: {label}" in ext4 and report.human_bytes(figures[key]) in ext4, ext4
    inside = [e for e in dom.elements if e[0] == "rect"]
    widths = {e[1]["fill"]: int(e[1]["width"]) for e in inside if e[1]["fill"] in report.COLORS.values()}
    assert set(widths) == set(report.COLORS.values()), widths
    by_width = sorted(report.COLORS, key=lambda k: widths[report.COLORS[k]])
    assert by_width == sorted(figures, key=lambda k: figures[k] or 0), (widths, figures)
    html = (run[0] / "report.html").read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html
