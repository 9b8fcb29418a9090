"""`bootc-unified-qualify`: run the VM scenarios over the filesystems and write the report.

The scenarios are the VM tier's pytest functions (harness.qualify.scenarios names them); this
command maps its options to one pytest run (pytest-xdist for -n), with the qualify plugin feeding
events to the live progress, then writes OUTPUT/results.json and OUTPUT/report.html next to
pytest's own OUTPUT/junit.xml, the VM artifacts (OUTPUT/artifacts/<test>/) and pytest's output
(OUTPUT/pytest.log).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console
from rich.live import Live

from harness import userimages
from harness.qualify import events, report, results
from harness.qualify.progress import Progress, clock
from harness.qualify.scenarios import (
    DEFAULT,
    FILESYSTEMS,
    SCENARIOS,
    Scenario,
    UnknownScenario,
    covered,
    resolve,
    taking,
)
from harness.vm import libvirtd

PROJECT = Path(__file__).resolve().parents[2]  # the source checkout: tests/vm lives there
MARKER = ".bootc-unified-qualify"  # marks an output directory this command may clear
LIBVIRT_URI_ENV = libvirtd.URI_ENV
LOCAL_HOSTS = ("", "localhost", "127.0.0.1", "::1")


EPILOG = f"""\
scenarios (default: {", ".join(DEFAULT)}):
{chr(10).join(f"  {s.name:<18} {s.description}" for s in SCENARIOS)}
  A name a scenario covers selects it: {", ".join(sorted(covered()))}.

images: the scenarios run on the built-in test images (images/guest: a Debian trixie base with
  this checkout's bootc-unified). --image REF qualifies your own image instead of v1 in the
  scenarios that take one (the default with --image: {", ".join(s.name for s in taking("v1"))}). It must be
  derived from our base (FROM the built-in v1 image: it has our package and the harness's SSH
  key). It is copied with skopeo into the run's test registry under the name the scenario
  installs; the generic checks run (boots from composefs, status JSON, zero-copy, podman run
  <booted image>), the ones about the built-in image's own files do not. REF is a skopeo
  reference (docker:// by default; containers-storage:, oci:, ...). --update-image REF (the image
  to update to) is taken by: {", ".join(s.name for s in taking("v2")) or "no scenario yet"}.

exit status: 0 every scenario passed; 1 a scenario failed; 2 usage; 3 the harness could not run
  a scenario (skipped for a missing prerequisite, interrupted, no scenario collected).

expected wall time per filesystem under TCG (KVM: a fraction): power-cut ~30 min, lifecycle
  ~25 min, set-unified ~15 min, tamper ~15 min, update ~10 min, install ~3-10 min, smoke ~2 min,
  zstd-chunked ~2.5 min.
"""


class UsageError(Exception):
    """A bad option: one line, exit status 2."""


@dataclass(frozen=True)
class Options:
    filesystems: tuple[str, ...]
    scenarios: tuple[Scenario, ...]
    backend: str | None  # None: the harness default (mixed: XFS on QEMU, the others on libvirt)
    libvirt_uri: str | None
    workers: int
    keep_vm_on_failure: bool
    output: Path
    image: str | None = None  # --image: a user's image standing in for v1
    update_image: str | None = None  # --update-image: ... for v2

    @property
    def images(self) -> dict[str, str]:
        """variant -> the user's image standing in for it (results.IMAGE_FLAGS names the options)."""
        return {v: ref for v, ref in (("v1", self.image), ("v2", self.update_image)) if ref}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bootc-unified-qualify",
        description="Qualify bootc-unified: install, update, roll back and GC, zero-copy, on btrfs, XFS "
        "and ext4, in real VMs; writes report.html, junit.xml and results.json.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--fs",
        action="append",
        metavar="FS",
        help=f"filesystem to run on (repeatable or comma-separated; default: {','.join(FILESYSTEMS)})",
    )
    p.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help="scenario to run (repeatable or comma-separated; `all` for every one; default: the list below)",
    )
    p.add_argument(
        "--image", metavar="REF", help="your OS image to qualify, derived from our base (see images below)"
    )
    p.add_argument("--update-image", metavar="REF", help="your image to update to (see images below)")
    p.add_argument(
        "--backend",
        choices=("libvirt", "qemu"),
        help="how VMs run (default: XFS on plain QEMU, btrfs and ext4 on libvirt)",
    )
    p.add_argument(
        "--libvirt-uri",
        metavar="URI",
        help=f"libvirt connection for the libvirt backend (default qemu:///system; env {LIBVIRT_URI_ENV}); "
        "implies --backend libvirt",
    )
    p.add_argument("-n", dest="workers", type=int, default=1, metavar="N", help="parallel VMs (default 1)")
    p.add_argument(
        "--keep-vm-on-failure", action="store_true", help="leave a failed scenario's VM running (prints SSH)"
    )
    p.add_argument(
        "--output",
        type=Path,
        default=PROJECT / "artifacts" / "qualify",
        metavar="DIR",
        help="where report.html, junit.xml, results.json and the VM artifacts go (default artifacts/qualify)",
    )
    return p


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def parse(argv: Sequence[str]) -> Options:
    """Options from the command line; UsageError (one line) for what cannot run."""
    args = parser().parse_args(argv)
    filesystems = _split(args.fs) or list(FILESYSTEMS)
    unknown = [fs for fs in filesystems if fs not in FILESYSTEMS]
    if unknown:
        raise UsageError(f"--fs {unknown[0]}: unknown filesystem; choose from {', '.join(FILESYSTEMS)}")
    users = {v: ref for v, ref in (("v1", args.image), ("v2", args.update_image)) if ref is not None}
    default = list(DEFAULT)
    if users:  # the default set: what takes every image given
        default = [s.name for s in SCENARIOS if set(users) <= set(s.user_images)]
    try:
        scenarios = resolve(_split(args.scenario) or default)
    except UnknownScenario as e:
        raise UsageError(f"--scenario: {e}") from None
    flags = results.IMAGE_FLAGS
    for variant, ref in users.items():
        if not taking(variant):
            raise UsageError(f"{flags[variant]} {ref}: no scenario takes {flags[variant]} yet")
    for variant, ref in users.items():
        builtin = [s.name for s in scenarios if variant not in s.user_images]
        if builtin:
            takers = ", ".join(s.name for s in taking(variant))
            raise UsageError(
                f"{flags[variant]} {ref}: scenario {', '.join(builtin)} runs on the built-in images only; "
                f"{flags[variant]} is taken by: {takers}"
            )
    runnable = [s for s in scenarios if set(s.filesystems) & set(filesystems)]
    if not runnable:
        names = ", ".join(f"{s.name} ({'/'.join(s.filesystems)})" for s in scenarios)
        raise UsageError(f"no selected scenario runs on {', '.join(filesystems)}: {names}")
    if args.workers < 1:
        raise UsageError(f"-n {args.workers}: needs at least one VM")
    backend = args.backend
    if args.libvirt_uri is not None:
        check_libvirt_uri(args.libvirt_uri)
        if backend == "qemu":
            raise UsageError("--libvirt-uri needs the libvirt backend, not --backend qemu")
        backend = "libvirt"
    return Options(
        filesystems=tuple(fs for fs in FILESYSTEMS if fs in filesystems),
        scenarios=tuple(runnable),
        backend=backend,
        libvirt_uri=args.libvirt_uri,
        workers=args.workers,
        keep_vm_on_failure=args.keep_vm_on_failure,
        output=args.output.absolute(),
        image=args.image,
        update_image=args.update_image,
    )


def check_images(opts: Options) -> None:
    """The user's images can be read (skopeo inspect), before any VM starts."""
    for flag, ref in (("--image", opts.image), ("--update-image", opts.update_image)):
        if ref is not None:
            try:
                userimages.inspect(ref)
            except userimages.UserImageError as e:
                raise UsageError(f"{flag}: {e}") from None


def check_libvirt_uri(uri: str) -> None:
    parts = urlsplit(uri)
    if not parts.scheme.startswith("qemu"):
        raise UsageError(f"--libvirt-uri {uri}: not a QEMU driver URI (qemu:///system, qemu+ssh://...)")
    if (parts.hostname or "") not in LOCAL_HOSTS:
        raise UsageError(
            f"--libvirt-uri {uri}: not supported yet: a remote host needs the VM disks and the SSH "
            "forward there, and they are made on this host"
        )


def pytest_args(opts: Options) -> list[str]:
    """The pytest command line (after `python -m pytest`) for these options, run from PROJECT."""
    out = opts.output
    args = [node for s in opts.scenarios for node in s.nodes]
    args += [
        "-p",
        "harness.qualify.plugin",
        "--qualify-events",
        str(out / "events.jsonl"),
        "--junitxml",
        str(out / "junit.xml"),
        "-o",
        "junit_suite_name=bootc-unified-qualify",
        "--vm-artifacts",
        str(out / "artifacts"),
        "--fs",
        ",".join(opts.filesystems),
        "--scenarios",
        "all",
        "-p",
        "no:cacheprovider",
        "-rfEs",
    ]
    if opts.backend:
        args += ["--vm-backend", opts.backend]
    if opts.keep_vm_on_failure:
        args.append("--keep-vm-on-failure")
    if opts.image:
        args += ["--user-image", opts.image]
    if opts.update_image:
        args += ["--user-update-image", opts.update_image]
    if opts.workers > 1:
        args += ["-n", str(opts.workers), "--dist", "load", "--maxschedchunk", "1"]  # longest first
    return args


def pytest_env(opts: Options) -> dict[str, str]:
    env = dict(os.environ)
    if opts.libvirt_uri:
        env[LIBVIRT_URI_ENV] = opts.libvirt_uri
    return env


def prepare_output(output: Path) -> None:
    """An empty output directory, or one a previous run of this command wrote (cleared)."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output}: not a directory")
    if output.is_dir() and any(output.iterdir()):
        if not (output / MARKER).is_file():
            raise UsageError(
                f"--output {output}: not empty and not a previous qualification's output; name another"
            )
        for entry in output.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    output.mkdir(parents=True, exist_ok=True)
    (output / MARKER).write_text("written by bootc-unified-qualify; cleared by its next run\n")


def run_pytest(opts: Options, console: Console, project: Path) -> int:
    argv = [sys.executable, "-m", "pytest", *pytest_args(opts)]
    progress = Progress(opts.output / "artifacts", opts.workers, console)
    tail = events.Tail(opts.output / "events.jsonl")
    with open(opts.output / "pytest.log", "wb") as log:
        child = subprocess.Popen(
            argv,
            cwd=project,
            env=pytest_env(opts),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        live = Live(progress.render(), console=console, refresh_per_second=2) if console.is_terminal else None
        try:
            if live is not None:
                live.start()
            while True:
                code = child.poll()
                progress.feed(tail.read())
                progress.poll_steps()
                if live is not None:
                    live.update(progress.render())
                if code is not None:
                    return code
                time.sleep(1.0)
        except KeyboardInterrupt:
            console.print("interrupted: waiting for pytest to tear its VMs down")
            return child.wait()
        finally:
            if live is not None:
                live.stop()


def summary(doc: results.Results, console: Console) -> None:
    for r in doc.results:
        why = ""
        if r.failure:
            why = f" ({r.failure.phase}{', step ' + repr(r.failure.step) if r.failure.step else ''}: "
            why += f"{r.failure.message.splitlines()[0][:160] if r.failure.message else '?'})"
        elif r.skip_reason:
            why = f" ({r.skip_reason[:160]})"
        p5 = f", P5 {r.p5:.2f}" if r.p5 is not None else ""
        console.print(
            f"{r.outcome:<8} {r.scenario}[{r.fs or 'any'}] {clock(r.wall_seconds)}, "
            f"{r.boots if r.boots is not None else '?'} boot(s){p5}{why}",
            highlight=False,
            markup=False,
        )
        if r.outcome in ("failed", "error"):
            console.print(f"         reproduce: {r.reproduce}", highlight=False, markup=False)


def main(argv: Sequence[str] | None = None, project: Path = PROJECT, console: Console | None = None) -> int:
    """Run the qualification; returns the exit status. `project` is the checkout whose tests/vm
    holds the scenarios (tests run other, small ones through the same path)."""
    console = console or Console(stderr=True)
    try:
        opts = parse(sys.argv[1:] if argv is None else argv)
        check_images(opts)
        prepare_output(opts.output)
    except UsageError as e:
        print(f"bootc-unified-qualify: {e}", file=sys.stderr)
        return results.EXIT_USAGE
    command = ["bootc-unified-qualify", *(sys.argv[1:] if argv is None else argv)]
    started = datetime.datetime.now(datetime.UTC)
    wall = time.monotonic()
    console.print(
        f"qualifying {', '.join(s.name for s in opts.scenarios)} on {', '.join(opts.filesystems)} "
        f"-> {opts.output} (pytest output: {opts.output / 'pytest.log'})",
        highlight=False,
    )
    code = run_pytest(opts, console, project)
    info = results.RunInfo(
        started=started.isoformat(timespec="seconds"),
        finished=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        wall_seconds=round(time.monotonic() - wall, 1),
        command=command,
        pytest_command=["python", "-m", "pytest", *pytest_args(opts)],
        pytest_exit=code,
        filesystems=list(opts.filesystems),
        scenarios=[s.name for s in opts.scenarios],
        backend=opts.backend or "mixed",
        workers=opts.workers,
        images=opts.images,
    )
    doc = results.build(events.read_all(opts.output / "events.jsonl"), opts.output, info)
    tmp = opts.output / ".results.json.tmp"
    tmp.write_text(doc.to_json())
    tmp.replace(opts.output / "results.json")
    report.write(doc, opts.output / "report.html")
    summary(doc, console)
    if not doc.results:
        console.print(f"no scenario ran; pytest said (exit {code}):", highlight=False)
        log = (opts.output / "pytest.log").read_text(errors="replace").splitlines()
        console.print("\n".join(log[-30:]), highlight=False, markup=False)
    console.print(f"report: {opts.output / 'report.html'}  (exit status {doc.exit_status})", highlight=False)
    return doc.exit_status


def run() -> None:
    sys.exit(main())
