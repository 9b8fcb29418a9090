"""Crash injection on a loop sysroot, and what must hold after every crash.

- `Sandbox`: a sysroot (root/, esp/ and run/ for the staged marker) that can be saved and put back
  exactly (`cp -a --reflink=auto`, at the same paths: the bootc store's libpod state pins them), so
  each crash starts from the same state.
- `run_killed()`: a `bootc-unified` subprocess in its own process group, killed by a named crash
  point (BOOTC_UNIFIED_CRASH_AT, bootc_unified/faults.py: it SIGKILLs itself) or by SIGKILL from here
  after a delay; either way, what it started (podman) is killed with it, as systemd kills a
  service's cgroup.
- `invariants()`: the oracles after a crash: the repository's fsck (the CLI), every ref resolving,
  every BLS entry (`loader/entries`, `loader/entries.staged`) naming an EROFS image, a state dir
  and kernel files that exist, the staged marker absent or naming a complete staging, `status`
  showing the booted deployment, and podman (its own configuration) listing the store's images.
- `Tally`: crashes per (verb, point, outcome), printed as a table and saved as JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bootc_unified.deploy import bls
from bootc_unified.deploy.sysroot import Esp
from bootc_unified.imgstore import ImageStore
from bootc_unified.repository.refs import links_under, object_id_of
from harness.scratchpodman import ScratchPodman, unmount_under
from testsupport.plugin import CLI, run_cli

CRASH_ENV = "BOOTC_UNIFIED_CRASH_AT"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "crash"


# --- the sandbox ---------------------------------------------------------------------------------


@dataclass
class Sandbox:
    base: Path  # on the loop filesystem: root/, esp/, run/ and the saved states

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def esp(self) -> Path:
        return self.base / "esp"

    @property
    def run(self) -> Path:
        return self.base / "run"

    @property
    def marker(self) -> Path:
        return self.run / "staged-deployment"

    @property
    def store(self) -> Path:
        return self.root / "ostree/bootc/storage"

    @property
    def repo(self) -> Path:
        return self.root / "composefs"

    def create(self) -> Sandbox:
        for d in (self.root, self.esp, self.run):
            d.mkdir(parents=True)
        return self

    def quiesce(self) -> None:
        """Nothing of podman's mounted or running for this store (before a copy or a removal)."""
        ImageStore(self.store).cleanup_runtime()
        unmount_under(self.root)

    def save(self, name: str) -> None:
        self.quiesce()
        dest = self.base / f"saved-{name}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        _copy([self.root, self.esp, self.run], dest)

    def restore(self, name: str) -> None:
        self.quiesce()
        for d in (self.root, self.esp, self.run):
            shutil.rmtree(d)
        saved = self.base / f"saved-{name}"
        _copy([saved / d for d in ("root", "esp", "run")], self.base)

    def mountinfo(self, booted: str) -> Path:
        """A mountinfo as a system booted from `booted` has it (`/` = composefs:<id>)."""
        path = self.base / f"mountinfo-{booted[:12]}"
        path.write_text(
            "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
            f"36 1 0:40 / / ro,relatime shared:1 - overlay composefs:{booted} ro,lowerdir+=/x\n"
            "40 36 7:0 / /sysroot ro,relatime shared:2 - ext4 /dev/vda2 ro\n"
        )
        return path

    def system_args(self, booted: str) -> list[str]:
        """--sysroot/--esp/--mountinfo/--staged-marker as every deployment verb takes them."""
        return [
            *("--sysroot", str(self.root), "--esp", str(self.esp)),
            *("--mountinfo", str(self.mountinfo(booted)), "--staged-marker", str(self.marker)),
        ]


# --- running and killing -------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


def _copy(sources: list[Path], dest: Path) -> None:
    """cp -a (reflinks where the filesystem has them); a failure carries cp's own words."""
    argv = ["cp", "-a", "--reflink=auto", *map(str, sources), str(dest)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        why = proc.stderr.strip()[-2000:]
        raise AssertionError(f"copying {', '.join(map(str, sources))} to {dest}: {why}")


def run_killed(argv: list[str], point: str | None = None, kill_after: float | None = None) -> Outcome:
    """Run `bootc-unified ARGV`; with `point`, it kills itself there; with `kill_after`, SIGKILL it
    after that many seconds (unless it finished first). Its process group is killed afterwards."""
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if point is not None:
        env[CRASH_ENV] = point
    start = time.monotonic()
    proc = subprocess.Popen(
        [*CLI, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        if kill_after is not None:
            try:
                proc.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what it started goes with it
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Outcome(proc.returncode, out, err, time.monotonic() - start)


# --- the oracles -----------------------------------------------------------------------------------


def _entry_ids(directory: Path) -> list[tuple[str, bls.BlsEntry]]:
    out = []
    for ef in bls.read_entries(directory):
        arg = ef.entry.composefs  # raises for a garbled entry: a crash must never leave one
        assert arg is not None, f"{ef.path}: no composefs= option"
        out.append((arg.digest, ef.entry))
    return out


def store_digests(sb: Sandbox) -> set[str]:
    """The manifest digests of the store's images, as podman itself lists them (its own config, the
    store's own runroot: a libpod database written with another would lock the store's podman out)."""
    if not (sb.store / "overlay-images").is_dir():
        return set()
    pm = ScratchPodman(sb.base / "podman-view", graphroot=sb.store, runroot=ImageStore(sb.store).runroot)
    try:
        listed = pm.images()
    finally:
        pm.close()
    return {str(i["Digest"]) for i in listed}


def origin_digest(sb: Sandbox, depl_id: str) -> str | None:
    origin = sb.root / "state/deploy" / depl_id / f"{depl_id}.origin"
    for line in origin.read_text().splitlines():
        if line.startswith("manifest_digest = "):
            return line.split(" = ", 1)[1].strip()
    return None


def processes_naming(path: Path) -> list[str]:
    """Command lines of live processes that name `path` (podman runs with --root <store>)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if any(str(path).encode() in a for a in argv):
                    found.append(b" ".join(argv).decode(errors="replace")[:300])
    return found


def invariants(sb: Sandbox, booted: str, store_kept: set[str], label: str) -> dict[str, object]:
    """Assert what must hold after any crash; returns `status --format json`'s document.

    `store_kept`: manifest digests the store held before; those of live deployments must still be
    listed by podman."""
    deadline = time.monotonic() + 5.0  # the kernel's SIGKILL of children takes a moment to land
    while (left := processes_naming(sb.store)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"{label}: the killed verb left processes behind: {left[:2]}"
    leaked = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(sb.root) in line]
    assert not leaked, f"{label}: the killed verb left mounts behind: {leaked[:2]}"
    fsck = run_cli("internals", "cfs", "--repo", sb.repo, "fsck", check=False)
    assert fsck.returncode == 0, f"{label}: fsck: {fsck.stdout}{fsck.stderr}"
    objects = sb.repo / "objects"
    for top in ("streams/refs", "images/refs"):
        for link in links_under(sb.repo / top):
            assert object_id_of(link, objects) is not None, f"{label}: ref {link} names nothing"

    esp = Esp(sb.esp)
    menu = _entry_ids(esp.entries)
    staged_entries = _entry_ids(esp.entries_staged)
    assert booted in [d for d, _ in menu], f"{label}: the booted deployment left loader/entries"
    for depl_id, entry in menu + staged_entries:
        image = sb.repo / "images" / depl_id
        assert object_id_of(image, objects) == depl_id, f"{label}: entry for {depl_id[:12]}: no EROFS image"
        state = sb.root / "state/deploy" / depl_id
        assert (state / f"{depl_id}.origin").is_file() and (state / "etc").is_dir(), (
            f"{label}: entry for {depl_id[:12]}: no state dir"
        )
        for path in (entry.linux, *entry.initrd):
            assert path and (sb.esp / path.lstrip("/")).is_file(), f"{label}: entry names missing {path}"

    live = {d for d, _ in menu + staged_entries}
    if sb.marker.exists():
        marker = json.loads(sb.marker.read_text())
        staged_id = marker["depl_id"]
        # staged (loader/entries.staged), or finalize was killed after its swap: already in the menu
        assert staged_id in live, f"{label}: the staged marker names {staged_id[:12]}, in no entry"
        live.add(staged_id)

    status = run_cli("status", *sb.system_args(booted)[:8], "--format", "json", check=False)
    assert status.returncode == 0, f"{label}: status: {status.stderr}"
    doc: dict[str, object] = json.loads(status.stdout)
    shown = doc["status"]["booted"]["composefs"]["verity"]  # type: ignore[index]
    assert shown == booted, f"{label}: status shows {shown} booted"

    if (sb.store / "overlay-images").is_dir() or store_kept:
        listed = store_digests(sb)
        needed = {d for d in (origin_digest(sb, i) for i in live) if d in store_kept}
        assert needed <= listed, f"{label}: store lost {needed - listed}"
    return doc


# --- fingerprints: the end state of a verb, to compare with an uninterrupted run ------------------


def _tree(path: Path) -> dict[str, str]:
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[rel] = "dir"
    return out


def fingerprint(sb: Sandbox, with_store: bool = True) -> dict[str, object]:
    """What an uninterrupted run and a crashed-then-rerun one must agree on: the ESP and state dirs
    (bytes), the marker, the repository's refs and object names, the store's images (podman)."""
    repo_objects = sorted(p.name for d in (sb.repo / "objects").iterdir() if d.is_dir() for p in d.iterdir())
    return {
        "esp": _tree(sb.esp),
        "state": _tree(sb.root / "state/deploy"),
        "marker": sb.marker.read_text() if sb.marker.exists() else None,
        "refs": {
            str(link.relative_to(sb.repo)): object_id_of(link, sb.repo / "objects")
            for top in ("streams/refs", "images/refs")
            for link in links_under(sb.repo / top)
        },
        "objects": repo_objects,
        "store": sorted(store_digests(sb)) if with_store else None,
        "leftovers": sorted(p.name for p in (sb.root / "ostree/bootc").glob(".*")),
    }


def differences(want: dict[str, object], got: dict[str, object]) -> list[str]:
    out = []
    for key in want:
        a, b = want[key], got[key]
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    out.append(f"{key}/{k}: {a.get(k)!r} != {b.get(k)!r}")
        else:
            out.append(f"{key}: {a!r} != {b!r}")
    return out


def menu_order(sb: Sandbox) -> list[str]:
    return [d for d, _ in _entry_ids(Esp(sb.esp).entries)]


# --- the tally -------------------------------------------------------------------------------------


@dataclass
class Tally:
    fs: str
    rows: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (verb, point, outcome)

    def add(self, verb: str, point: str, outcome: str) -> None:
        self.rows[(verb, point, outcome)] += 1

    @property
    def crashes(self) -> int:
        return sum(n for (_v, _p, o), n in self.rows.items() if o != "finished first")

    def table(self) -> str:
        lines = [f"{'verb':<12} {'point':<32} {'n':>3}  outcome"]
        for (verb, point, outcome), n in sorted(self.rows.items()):
            lines.append(f"{verb:<12} {point:<32} {n:>3}  {outcome}")
        lines.append(f"{self.fs}: {self.crashes} crashes")
        return "\n".join(lines)

    def save(self, name: str, kind: str = "crashes") -> Path:
        """artifacts/crash/<name>.json; `kind` "rounds" for concurrency rounds (not crashes)."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.json"
        rows = [
            {"fs": self.fs, "verb": v, "point": p, "outcome": o, "count": n}
            for (v, p, o), n in sorted(self.rows.items())
        ]
        doc = {"fs": self.fs, "kind": kind, "crashes": self.crashes if kind == "crashes" else 0, "rows": rows}
        path.write_text(json.dumps(doc, indent=1))
        return path
