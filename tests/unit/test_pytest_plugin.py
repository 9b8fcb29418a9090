"""The harness's pytest plugin: `--fs` selection and the @pytest.mark.fs(...) marker.

Oracle: a separate pytest process collecting a tiny generated test file with the plugin loaded, its
exit status and its own report of what it collected.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

INI = """[pytest]
addopts = -p harness.pytest_plugin --strict-markers
markers =
    fs(*names): run only on these loop filesystems
    sample(*names): with --scenarios=sample, only these
    qualification_only: not with --scenarios=sample
"""


def collect(tmp_path: Path, body: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`pytest --collect-only -q` of a test file holding `body`, in a process of its own."""
    (tmp_path / "pytest.ini").write_text(INI)
    (tmp_path / "test_generated.py").write_text(f"import pytest\n\n\n{body}")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=tmp_path,
        env={**os.environ, "BOOTC_UNIFIED_CACHE": str(tmp_path / "cache")},  # not ours to prune
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_fs_marker_narrows_the_selection(tmp_path: Path) -> None:
    body = '@pytest.mark.fs("xfs", "ext4")\ndef test_it(fs_kind):\n    pass\n'
    proc = collect(tmp_path, body, "--fs", "btrfs,xfs,ext4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test_generated.py::test_it[xfs]" in proc.stdout
    assert "test_generated.py::test_it[ext4]" in proc.stdout
    assert "[btrfs]" not in proc.stdout


@pytest.mark.parametrize(("scenarios", "kinds"), [("sample", ["xfs"]), ("all", ["btrfs", "xfs", "ext4"])])
def test_sample_marker_narrows_a_sampled_run(tmp_path: Path, scenarios: str, kinds: list[str]) -> None:
    """ci/test's `--scenarios sample`: a long scenario on its sample filesystem only."""
    body = '@pytest.mark.sample("xfs")\ndef test_it(fs_kind):\n    pass\n'
    proc = collect(tmp_path, body, "--fs", "btrfs,xfs,ext4", "--scenarios", scenarios)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = [line.split("[")[1].rstrip("]") for line in proc.stdout.splitlines() if "::test_it[" in line]
    assert got == kinds


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ('fs("ext5")', "@pytest.mark.fs: unknown filesystem 'ext5'"),
        ('fs("xfs", "btfrs")', "@pytest.mark.fs: unknown filesystem 'btfrs'"),
        ("fs()", "@pytest.mark.fs: expects filesystem names"),
        ('sample("zfs")', "@pytest.mark.sample: unknown filesystem 'zfs'"),
    ],
)
@pytest.mark.parametrize("uses_fs_kind", [True, False])
def test_misspelt_fs_marker_is_a_usage_error(
    tmp_path: Path, marker: str, message: str, uses_fs_kind: bool
) -> None:
    """Not a silent skip: the run fails, naming the test and the bad value."""
    args = "fs_kind" if uses_fs_kind else ""
    proc = collect(tmp_path, f"@pytest.mark.{marker}\ndef test_it({args}):\n    pass\n")
    output = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 5), output  # 5: nothing collected
    assert f"test_generated.py::test_it: {message}; choose from btrfs, xfs, ext4" in output, output
    assert "1 test collected" not in output and "[xfs]" not in output


def test_the_longest_scenarios_are_collected_first() -> None:
    """The order the workers take tests in (ci/test: --dist load --maxschedchunk 1): VM scenarios'
    tests by expected wall time (a scenario's shared among its functions), longest first, then
    everything else in file order."""
    from harness.qualify.scenarios import owner

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "--scenarios", "sample", "tests/unit/test_tarsplit.py", "tests/vm"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    times = [s.expected_seconds / len(s.nodes) if (s := owner(i)) else 0.0 for i in ids]
    assert times == sorted(times, reverse=True), ids
    longest = max(s.expected_seconds / len(s.nodes) for i in ids if (s := owner(i)))
    assert times[0] == longest and times[-1] == 0.0
    rest = [i for i in ids if owner(i) is None]
    assert rest[0].startswith("tests/unit/test_tarsplit.py::"), rest[:3]  # file order kept after them


@pytest.mark.parametrize(("scenarios", "collected"), [("sample", False), ("all", True)])
def test_a_qualification_only_scenario_is_deselected_from_a_sampled_run(
    tmp_path: Path, scenarios: str, collected: bool
) -> None:
    """ci/test's `--scenarios sample` leaves it out, visibly (pytest's own "deselected" count)."""
    body = "@pytest.mark.qualification_only\ndef test_it(fs_kind):\n    pass\n\n\n"
    body += "def test_other():\n    pass\n"
    proc = collect(tmp_path, body, "--fs", "xfs", "--scenarios", scenarios)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ("test_generated.py::test_it[xfs]" in proc.stdout) is collected, proc.stdout
    assert "test_generated.py::test_other" in proc.stdout
    assert ("1 deselected" in proc.stdout) is not collected, proc.stdout
