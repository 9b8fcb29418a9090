"""bootc-unified-qualify's options -> the pytest command line it runs.

Oracles: pytest itself (`--collect-only` of the generated command line in a process of its own
names exactly the scenario x filesystem tests asked for), and the one-line refusals.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from harness.qualify import cli, results
from harness.qualify.scenarios import BY_NAME, DEFAULT, FILESYSTEMS, taking
from harness.vm import libvirtd

PROJECT = Path(__file__).resolve().parents[2]


def args_of(*argv: str, tmp_path: Path) -> tuple[cli.Options, list[str]]:
    opts = cli.parse([*argv, "--output", str(tmp_path / "out")])
    return opts, cli.pytest_args(opts)


def value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_defaults(tmp_path: Path) -> None:
    opts, args = args_of(tmp_path=tmp_path)
    assert [s.name for s in opts.scenarios] == list(DEFAULT)
    assert [a for a in args if a.startswith("tests/")] == [n for s in DEFAULT for n in BY_NAME[s].nodes]
    assert value(args, "--fs") == ",".join(FILESYSTEMS)
    assert value(args, "--scenarios") == "all"  # never the CI sample
    assert value(args, "--junitxml") == str(tmp_path / "out" / "junit.xml")
    assert value(args, "--vm-artifacts") == str(tmp_path / "out" / "artifacts")
    assert value(args, "--qualify-events") == str(tmp_path / "out" / "events.jsonl")
    assert "harness.qualify.plugin" in args
    assert "-n" not in args and "--vm-backend" not in args and "--keep-vm-on-failure" not in args


def test_a_users_image_selects_the_scenarios_that_take_it(tmp_path: Path) -> None:
    opts, args = args_of("--image", "quay.io/x/os:1", "--fs", "ext4", tmp_path=tmp_path)
    assert [s.name for s in opts.scenarios] == [s.name for s in taking("v1")] == ["install", "update"]
    assert value(args, "--user-image") == "quay.io/x/os:1" and "--user-update-image" not in args
    nodes = [*BY_NAME["install"].nodes, *BY_NAME["update"].nodes]
    assert [a for a in args if a.startswith("tests/")] == nodes
    # both images: what takes both (the update scenario); the update image alone: the same
    both = ("--image", "quay.io/x/os:1", "--update-image", "quay.io/x/os:2")
    for argv in (both, ("--update-image", "x/os:2")):
        opts, args = args_of(*argv, tmp_path=tmp_path)
        assert [s.name for s in opts.scenarios] == [s.name for s in taking("v2")] == ["update"]
        assert value(args, "--user-update-image") == argv[-1]


def test_filesystems_repeatable_or_comma_separated_in_registry_order(tmp_path: Path) -> None:
    _, args = args_of("--fs", "ext4", "--fs", "xfs", tmp_path=tmp_path)
    assert value(args, "--fs") == "xfs,ext4"
    _, args = args_of("--fs", "ext4,btrfs", tmp_path=tmp_path)
    assert value(args, "--fs") == "btrfs,ext4"


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["upgrade"], ["lifecycle"]),
        (["rollback", "gc"], ["lifecycle"]),
        (["soft-reboot"], ["set-unified"]),
        (["verity"], ["verity-repository", "verity-guest"]),
        (["set-unified,smoke"], ["smoke", "set-unified"]),
        (["all"], list(BY_NAME)),
    ],
)
def test_scenario_names_and_what_they_cover(names: list[str], expected: list[str], tmp_path: Path) -> None:
    argv = [a for n in names for a in ("--scenario", n)]
    opts, args = args_of(*argv, tmp_path=tmp_path)
    assert [s.name for s in opts.scenarios] == expected
    assert [a for a in args if a.startswith("tests/")] == [n for s in expected for n in BY_NAME[s].nodes]


def test_scenarios_that_cannot_run_on_the_filesystems_are_dropped(tmp_path: Path) -> None:
    opts, _ = args_of("--fs", "xfs", "--scenario", "all", tmp_path=tmp_path)
    names = {s.name for s in opts.scenarios}
    assert "boot-composefs" not in names and "verity-guest" not in names
    assert {"smoke", "lifecycle", "install"} <= names


def test_backend_workers_keep(tmp_path: Path) -> None:
    _, args = args_of("--backend", "qemu", "-n", "2", "--keep-vm-on-failure", tmp_path=tmp_path)
    assert value(args, "--vm-backend") == "qemu"
    assert value(args, "-n") == "2"
    assert "--keep-vm-on-failure" in args


def test_libvirt_uri_goes_to_the_libvirt_backend(tmp_path: Path) -> None:
    opts, args = args_of("--libvirt-uri", "qemu:///system", tmp_path=tmp_path)
    assert value(args, "--vm-backend") == "libvirt"
    assert cli.pytest_env(opts)[libvirtd.URI_ENV] == "qemu:///system"
    assert libvirtd.URI_ENV not in cli.pytest_env(cli.parse(["--output", str(tmp_path)]))


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (
            ["--update-image", "quay.io/x/os:2", "--scenario", "install"],
            "--update-image quay.io/x/os:2: scenario install runs on the built-in images only; "
            "--update-image is taken by: update",
        ),
        (
            ["--image", "quay.io/x/os:1", "--scenario", "install,lifecycle"],
            "scenario lifecycle runs on the built-in images only; --image is taken by: install",
        ),
        (["--image", "docker://127.0.0.1:1/none:1"], "--image: image docker://127.0.0.1:1/none:1: "),
        (["--fs", "zfs"], "--fs zfs: unknown filesystem"),
        (["--scenario", "upgrade-everything"], "unknown scenario 'upgrade-everything'"),
        (["--fs", "xfs", "--scenario", "boot-composefs"], "no selected scenario runs on xfs"),
        (["-n", "0"], "-n 0: needs at least one VM"),
        (["--libvirt-uri", "qemu:///system", "--backend", "qemu"], "--libvirt-uri needs the libvirt backend"),
        (["--libvirt-uri", "qemu+ssh://root@far.example/system"], "not supported yet: a remote host"),
        (["--libvirt-uri", "xen:///system"], "not a QEMU driver URI"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(
    argv: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert cli.main([*argv, "--output", str(out)]) == results.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert not out.exists()


def test_output_directory_of_someone_else_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    assert cli.main(["--output", str(tmp_path)]) == results.EXIT_USAGE
    assert "not empty and not a previous qualification's output" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_previous_output_is_cleared(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cli.prepare_output(out)
    (out / "artifacts" / "old").mkdir(parents=True)
    (out / "report.html").write_text("old")
    cli.prepare_output(out)
    assert sorted(p.name for p in out.iterdir()) == [cli.MARKER]


@pytest.mark.parametrize(
    ("pytest_exit", "outcomes", "status"),
    [
        (0, ["passed", "passed"], results.EXIT_PASSED),
        (1, ["passed", "failed"], results.EXIT_FAILED),
        (1, ["error"], results.EXIT_FAILED),
        (0, ["passed", "skipped"], results.EXIT_INFRA),
        (2, ["passed", results.NOT_RUN], results.EXIT_INFRA),
        (5, [], results.EXIT_INFRA),
        (4, [], results.EXIT_USAGE),
    ],
)
def test_exit_status(pytest_exit: int, outcomes: list[str], status: int) -> None:
    got = [
        results.Result(
            "smoke", "ext4", f"n{i}", o, 1.0, {}, 1, [], [], {}, results.Files(), None, None, None, ""
        )
        for i, o in enumerate(outcomes)
    ]
    assert results.exit_status(pytest_exit, got) == status


def test_pytest_collects_exactly_the_asked_tests(tmp_path: Path) -> None:
    """The generated command line, given to pytest (collection only, no VM): the scenario x
    filesystem tests, by pytest's own node ids."""
    _, args = args_of("--fs", "ext4,xfs", "--scenario", "smoke,lifecycle,boot-composefs", tmp_path=tmp_path)
    (tmp_path / "out").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *args],
        cwd=PROJECT,
        env={**os.environ, "BOOTC_UNIFIED_CACHE": str(tmp_path / "cache")},  # not ours to prune
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = {line for line in proc.stdout.splitlines() if "::" in line}
    assert collected == {
        "tests/vm/test_smoke.py::test_smoke[xfs]",
        "tests/vm/test_smoke.py::test_smoke[ext4]",
        "tests/vm/test_lifecycle.py::test_lifecycle[xfs]",
        "tests/vm/test_lifecycle.py::test_lifecycle[ext4]",
        "tests/vm/test_boot_composefs.py::test_boot_composefs[ext4]",  # ext4 only (@pytest.mark.fs)
    }


@pytest.mark.parametrize(
    "argv",
    [
        ("--fs", "xfs", "--scenario", "lifecycle"),
        ("--fs", "ext4", "--image", "oci:/var/tmp/my os:1", "--update-image", "docker://x/os:2"),
        ("--fs", "btrfs", "--image", "quay.io/x/os:1", "--scenario", "install"),
    ],
)
def test_the_reproduce_line_runs_the_same_scenario_on_the_same_images(
    argv: tuple[str, ...], tmp_path: Path
) -> None:
    """The reproduce line of a result, parsed back by the qualification's own option parser."""
    opts, _ = args_of(*argv, tmp_path=tmp_path)
    for scenario in opts.scenarios:
        line = results.reproduce_command(scenario.name, opts.filesystems[0], opts.images)
        words = shlex.split(line)
        assert words[0] == "ci/qualify"
        again, _ = args_of(*words[1:], tmp_path=tmp_path)
        assert again.scenarios == (scenario,) and again.filesystems == opts.filesystems
        assert (again.image, again.update_image) == (opts.image, opts.update_image)


def test_p5_without_a_smoke_run_uses_the_runs_median_boot() -> None:
    """A run of a user's images (update only, no smoke): P5 from the median boot to SSH measured
    on that filesystem in the run; with smoke, smoke's bare boot."""

    def result(scenario: str, boots_to_ssh: list[float], wall: float, boots: int) -> results.Result:
        machine = results.Machine("vm", "libvirt", "tcg", len(boots_to_ssh), boots_to_ssh, [])
        files = results.Files()
        return results.Result(
            scenario,
            "ext4",
            scenario,
            "passed",
            wall,
            {},
            boots,
            [machine],
            [],
            {},
            files,
            None,
            None,
            None,
            "",
        )

    update = result("update", [150.0, 130.0, 100.0], 1200.0, 4)
    alone = results._boot_times("ext4", [update])
    assert alone.bare_boot_to_ssh == 130.0
    assert results._with_p5(update, alone.bare_boot_to_ssh).p5 == round(1200.0 / (4 * 130.0), 2)
    with_smoke = results._boot_times("ext4", [update, result("smoke", [60.0], 70.0, 1)])
    assert with_smoke.bare_boot_to_ssh == 60.0
