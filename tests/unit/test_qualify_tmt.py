"""tmt sees the scenarios by name, as the registry has them, and the CI plan runs.

Oracles: the fmf library tmt brings (the tree as tmt reads it) and a real `tmt run` of /plans/ci
(local provision: tmt copies the working tree and runs a few unit tests in the copy)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.pytest_plugin import require
from harness.qualify.scenarios import SCENARIOS

PROJECT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
TMT = VENV / "bin" / "tmt"
CI_PLAN_BUDGET = 90.0  # seconds


@pytest.fixture(scope="module")
def tree() -> Any:
    try:
        import fmf
    except ImportError:
        require(["the fmf library (pip install tmt: the project's test extra)"], "tmt metadata")
    return fmf.Tree(str(PROJECT))


def nodes(tree: Any, prefix: str) -> dict[str, dict[str, Any]]:
    return {n.name: n.data for n in tree.prune(names=[f"^{prefix}"]) if n.name.startswith(prefix)}


def test_fmf_scenarios_are_the_registry(tree: Any) -> None:
    tests = {name: data for name, data in nodes(tree, "/tests/vm/").items() if "test" in data}
    assert sorted(tests) == sorted(f"/tests/vm/{s.name}" for s in SCENARIOS), sorted(tests)
    for s in SCENARIOS:
        data = tests[f"/tests/vm/{s.name}"]
        want_tags = [*s.covers, *(["qualify"] if s.qualify else [])]
        got = (data["summary"], data["description"], data["tag"], data["environment"])
        assert got == (s.summary, s.description, want_tags, {"BOOTC_UNIFIED_SCENARIO": s.name}), (
            f"tests/vm/main.fmf /{s.name} disagrees with harness/qualify/scenarios.py: {got}"
        )
        assert "harness.qualify" in data["test"] and '"$BOOTC_UNIFIED_SCENARIO"' in data["test"]


def test_plans_keep_the_tiers(tree: Any) -> None:
    plans = nodes(tree, "/plans/")
    assert {"/plans/unit", "/plans/storage", "/plans/vm", "/plans/qualify", "/plans/ci"} <= set(plans)
    assert plans["/plans/qualify"]["discover"]["filter"] == "tag:qualify"


def test_ci_plan_runs(tmp_path: Path) -> None:
    """`tmt run` of /plans/ci passes, within its CI budget, and its test really ran pytest."""
    require([] if TMT.exists() else [f"{TMT} (pip install tmt: the project's test extra)"], "tmt")
    require([] if shutil.which("git") else ["git"], "tmt's tree copy")
    workdir = tmp_path / "run"
    run = ["run", "--scratch", "--id", str(workdir), "-e", f"BOOTC_UNIFIED_VENV={VENV}", "-vv"]
    proc = subprocess.run(
        [str(TMT), "--feeling-safe", *run, "plans", "--name", "^/plans/ci$"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=CI_PLAN_BUDGET * 2,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "1 test passed" in out, out[-4000:]
    logs = list(workdir.rglob("output.txt"))
    assert logs, f"no test output under {workdir}"
    text = "".join(p.read_text() for p in logs)
    assert " passed" in text and "failed" not in text, text[-2000:]
