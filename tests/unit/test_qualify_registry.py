"""The scenario registry against the VM tier as pytest collects it (a process of its own, no VM):
every VM test belongs to exactly one scenario, every scenario's nodes collect, and each scenario
runs on the filesystems the registry says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.qualify.scenarios import BY_NAME, DEFAULT, SCENARIOS, UnknownScenario, fs_of, owner, resolve

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vm_tests(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    cache = tmp_path_factory.mktemp("cache")  # the real build cache is not this session's to prune
    argv = ["--collect-only", "-q", "-m", "vm", "--fs", "btrfs,xfs,ext4", "--scenarios", "all", "tests/vm"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *argv],
        cwd=PROJECT,
        env={**os.environ, "BOOTC_UNIFIED_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(ids) > 10, proc.stdout
    return ids


def test_every_vm_test_has_one_scenario(vm_tests: list[str]) -> None:
    for nodeid in vm_tests:
        owners = [s.name for s in SCENARIOS if s.owns(nodeid)]
        assert len(owners) == 1, (nodeid, owners)
        assert owner(nodeid) is BY_NAME[owners[0]]


def test_every_scenario_collects_on_its_filesystems(vm_tests: list[str]) -> None:
    for scenario in SCENARIOS:
        mine = [n for n in vm_tests if scenario.owns(n)]
        assert mine, f"scenario {scenario.name}: {scenario.nodes} collect nothing"
        filesystems = {fs_of(n) for n in mine} - {None}
        if filesystems:  # parametrized over fs_kind
            assert filesystems == set(scenario.filesystems), (scenario.name, filesystems)


def test_default_set_answers_the_release_question() -> None:
    assert list(DEFAULT) == ["smoke", "install", "lifecycle", "set-unified", "zstd-chunked", "power-cut"]
    covered = {c for name in DEFAULT for c in BY_NAME[name].covers}
    wanted = {"install", "upgrade", "switch", "rollback", "gc", "lbi", "set-unified", "soft-reboot"}
    wanted.add("power-cut")
    assert wanted <= covered


def test_resolve() -> None:
    assert [s.name for s in resolve(["upgrade", "smoke", "lifecycle"])] == ["smoke", "lifecycle"]
    with pytest.raises(UnknownScenario, match="unknown scenario 'powercut'"):
        resolve(["powercut"])


def test_fs_of() -> None:
    assert fs_of("tests/vm/test_smoke.py::test_smoke[xfs]") == "xfs"
    assert fs_of("tests/vm/test_images.py::test_definitions_load") is None
    assert fs_of("tests/vm/test_x.py::test_y[ext4-v2]") == "ext4"
