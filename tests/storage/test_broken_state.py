"""Broken state on disk (issue 12, R3): one deployment of a loop sysroot damaged as a crash, a
full disk or a careless hand could leave it, then `status`, `rollback` and `switch` run on it.

The system: v1 installed (deployment a), then v2 (b) into the same root; booted b, the default,
so a is the rollback slot. One case damages a (or the staged marker); then

- `status` exits 0, shows b booted and a as rollback, and names the problem in a `Problem:` line
  (humanreadable) or a warning on stderr (json);
- `rollback` either works (the damage is cosmetic: the boot never reads it) and is undone again,
  or refuses in one line naming the path at fault, with the ESP and the marker untouched;
- `switch` to v3 still stages (c, with b as its secondary entry); the switch's GC keeps a while
  an entry names it (it is still in the boot menu until finalize); finalize drops a from the menu
  and its own GC a's state dir; the next `internals gc` a's image, refs and objects, and the
  repository's fsck is clean.

Oracles: the files written by hand (the damage), plain listings and bytes of the ESP before and
after a refusal, the repository's fsck (`internals cfs fsck`) and the object files on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootc_unified.erofs.reader import referenced_objects
from harness.pytest_plugin import require
from harness.registry import Registry
from harness.testimages import Buildah, push
from harness.testimages import missing_prerequisites as images_missing
from testsupport import bootimages
from testsupport.bootimages import (
    KERNEL_FILES,
    BootImage,
    Target,
    base_files,
    booted_mountinfo,
    build,
    install,
    listing,
)
from testsupport.plugin import run_cli

pytestmark = pytest.mark.storage

target = bootimages.target  # the fixture: a loop filesystem with root/ and esp/ directories


@pytest.fixture(scope="session")
def brk_images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, BootImage]:
    """v1, v2 (installed as a and b), v3 (the switch target); same kernel, each its own usr/share/big."""
    require(images_missing(), "building bootable test images")
    b = Buildah(tmp_path_factory.mktemp("brkimages"))
    out = {}
    try:
        for name, version in (("v1", "1.0"), ("v2", "2.0"), ("v3", "3.0")):
            build(b, f"brk-{name}", version, {**base_files(version), **KERNEL_FILES}, dirs=("sysroot",))
            ref, digest = push(b, f"brk-{name}", registry.address, "gzip")
            out[name] = BootImage(f"brk-{name}", ref, digest, version)
    finally:
        b.close()
    return out


# --- the system and the verbs -------------------------------------------------------------------


@dataclass
class System:
    t: Target
    tmp: Path
    a: str  # v1: the rollback slot
    b: str  # v2: booted, the default

    @property
    def marker(self) -> Path:
        return self.tmp / "staged-deployment"

    def args(self) -> list[str | Path]:
        return [
            *("--sysroot", self.t.root, "--esp", self.t.esp),
            *("--mountinfo", booted_mountinfo(self.b, self.tmp), "--staged-marker", self.marker),
        ]

    def status(self, fmt: str) -> subprocess.CompletedProcess[str]:
        return run_cli("status", *self.args(), "--format", fmt, check=False)

    def rollback(self) -> subprocess.CompletedProcess[str]:
        return run_cli("rollback", *self.args(), check=False)

    def switch(self, image: str) -> subprocess.CompletedProcess[str]:
        return self.update("switch", image)

    def update(self, verb: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return run_cli(
            verb,
            *self.args(),
            *("--etc", self.t.root / "state/deploy" / self.b / "etc"),
            *("--system-store", self.tmp / "no-system-store", "--no-systemd", "--tls-verify", "false"),
            "--quiet",
            *argv,
            check=False,
        )

    def finalize(self) -> subprocess.CompletedProcess[str]:
        etc = self.t.root / "state/deploy" / self.b / "etc"
        return run_cli("internals", "finalize-staged", *self.args(), "--etc", etc)

    def gc(self) -> subprocess.CompletedProcess[str]:
        return run_cli("internals", "gc", *self.args(), "--system-store", self.tmp / "no-system")

    def menu(self) -> list[str]:
        """composefs= ids of loader/entries (or another entries dir) in boot-menu order."""
        from bootc_unified.deploy import bls

        out = []
        for ef in bls.read_entries(self.t.esp / "loader/entries"):
            arg = ef.entry.composefs
            assert arg is not None
            out.append(arg.digest)
        return out

    def esp_bytes(self) -> dict[str, bytes | None]:
        return {
            rel: (self.t.esp / rel).read_bytes() if (self.t.esp / rel).is_file() else None
            for rel in listing(self.t.esp)
        }


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == 1, (proc.stdout, err)
    assert "\n" not in err and all(n in err for n in needles), err


def fsck(t: Target) -> subprocess.CompletedProcess[str]:
    return run_cli("internals", "cfs", "--repo", t.root / "composefs", "fsck", check=False)


# --- the damage -----------------------------------------------------------------------------------


def origin_garbage(s: System) -> str:
    origin = s.t.root / "state/deploy" / s.a / f"{s.a}.origin"
    origin.write_bytes(b"\x00\xffnot an origin\n[origin\n")
    return str(origin)


def entry_names_missing_image(s: System) -> str:
    repo = s.t.root / "composefs"
    image = repo / "images" / s.a
    os.unlink(os.path.realpath(image))  # the object and its name (a ref still points at it)
    image.unlink()
    return f"{image}: EROFS image is missing"


def state_dir_missing(s: System) -> str:
    state = s.t.root / "state/deploy" / s.a
    shutil.rmtree(state)
    return f"{state}: state directory is missing"


def erofs_truncated(s: System) -> str:
    image = s.t.root / "composefs/images" / s.a
    size = os.stat(image).st_size
    os.truncate(os.path.realpath(image), size // 2)
    return f"{image}: EROFS image is damaged"


def object_missing(s: System) -> str:
    """An object only a's image names (its own usr/share/big), removed."""
    repo = s.t.root / "composefs"
    mine = referenced_objects((repo / "images" / s.a).read_bytes())
    theirs = referenced_objects((repo / "images" / s.b).read_bytes())
    gone = sorted(mine - theirs)[0]
    path = repo / "objects" / gone[:2] / gone[2:]
    path.unlink()
    assert not path.exists()
    return f"object(s) it names are missing, first {path}"


def stale_staged_marker(s: System) -> str:
    """A marker naming a deployment that no longer exists (its entries and state dir are gone)."""
    ghost = "e" * len(s.a)
    s.marker.write_text(json.dumps({"depl_id": ghost, "finalization_locked": False}))
    return f"staged deployment {ghost[:16]}… has no boot entry"


def booted_origin_garbage(s: System) -> str:
    """The booted deployment's .origin garbled: status names it, switch still works (it names its
    image), upgrade refuses in one line naming the file (it has nothing to follow)."""
    origin = s.t.root / "state/deploy" / s.b / f"{s.b}.origin"
    origin.write_bytes(b"[origin]\ncontainer-image-reference=\x00\n")
    return str(origin)


def garbled_staged_marker(s: System) -> str:
    """A marker that is not JSON: status names it; rollback drops it; an update replaces it."""
    s.marker.write_bytes(b"\x00not json")
    return f"{s.marker}: not a staged-deployment marker"


@dataclass(frozen=True)
class Case:
    damage: Callable[[System], str]  # returns what status must name
    rollback_refused: bool  # else rollback works: the boot does not need what is damaged


CASES = {
    # the boot never reads .origin: rollback works; status names the file
    "origin-garbage": Case(origin_garbage, rollback_refused=False),
    "entry-names-missing-image": Case(entry_names_missing_image, rollback_refused=True),
    "state-dir-missing": Case(state_dir_missing, rollback_refused=True),
    "erofs-truncated": Case(erofs_truncated, rollback_refused=True),
    "object-missing": Case(object_missing, rollback_refused=True),
    # nothing is staged: rollback works (and drops the marker), as does switch (replaces it)
    "stale-staged-marker": Case(stale_staged_marker, rollback_refused=False),
    "garbled-staged-marker": Case(garbled_staged_marker, rollback_refused=False),
    "booted-origin-garbage": Case(booted_origin_garbage, rollback_refused=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_state(target: Target, brk_images: dict[str, BootImage], tmp_path: Path, case: str) -> None:
    t, imgs = target, brk_images
    install(t, "--allow-missing-verity", "--source-imgref", imgs["v1"].docker)
    (a,) = os.listdir(t.root / "state/deploy")
    install(t, "--allow-missing-verity", "--source-imgref", imgs["v2"].docker)
    (b,) = set(os.listdir(t.root / "state/deploy")) - {a}
    s = System(t, tmp_path, a, b)
    assert s.menu() == [b, a]
    assert "Problem" not in s.status("humanreadable").stdout  # whole before the damage

    named = CASES[case].damage(s)

    # status: works, lists both deployments, names the problem
    human = s.status("humanreadable")
    assert human.returncode == 0, human.stderr
    problems = [line for line in human.stdout.splitlines() if line.startswith("Problem: ")]
    assert any(named in p for p in problems), (named, human.stdout)
    as_json = s.status("json")
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["status"]["booted"]["composefs"]["verity"] == b
    assert doc["status"]["rollback"]["composefs"]["verity"] == a
    assert named in as_json.stderr and "bootc-unified: warning: " in as_json.stderr

    # rollback: refused in one line (nothing changed), or works and is undone again
    esp_before, marker_before = s.esp_bytes(), s.marker.exists()
    proc = s.rollback()
    if CASES[case].rollback_refused:
        one_line_error(proc, f"rollback: deployment {a[:16]}… cannot boot: ", named)
        assert s.esp_bytes() == esp_before and s.marker.exists() == marker_before
    else:
        assert proc.returncode == 0, proc.stderr
        assert f"Next boot: deployment {a}\n" in proc.stdout
        assert s.menu() == [a, b] and not s.marker.exists()
        assert "Reverting queued rollback state" in s.rollback().stdout
        assert s.menu() == [b, a]

    # switch: stages v3 beside the booted b; a stays while an entry names it. Its GC removes
    # nothing of the repository when a's image cannot be read (its objects are not known).
    if case in ("stale-staged-marker", "garbled-staged-marker"):
        CASES[case].damage(s)  # the rollback dropped it: the switch meets it too
    if case == "booted-origin-garbage":
        one_line_error(s.update("upgrade"), named, "switch IMAGE")
    proc = s.switch(imgs["v3"].docker)
    assert proc.returncode == 0, proc.stderr
    assert "Queued for next boot: " in proc.stdout, proc.stdout
    gc_line = proc.stdout.splitlines()[-1]
    if case == "entry-names-missing-image":  # a's manifest still names it (a ref)
        assert gc_line.startswith("GC: failed: ") and f"object {a} is missing" in gc_line, gc_line
    elif case == "erofs-truncated":
        assert gc_line.startswith(f"GC: failed: GC: EROFS image {a} is damaged ("), gc_line
        assert gc_line.endswith("nothing removed"), gc_line
    else:
        assert gc_line.startswith("GC: removed 0 deployments, 0 kernel dirs"), gc_line
    c = json.loads(s.marker.read_text())["depl_id"]
    assert c not in (a, b)
    doc = json.loads(s.status("json").stdout)
    assert doc["status"]["staged"]["composefs"]["verity"] == c
    assert doc["status"]["rollback"]["composefs"]["verity"] == a

    # finalize: the menu is c, b; a's state dir goes with finalize's GC, its image with the next GC
    s.finalize()
    assert s.menu() == [c, b]
    assert a not in os.listdir(t.root / "state/deploy")
    swept = s.gc()
    if case == "booted-origin-garbage":  # a live origin unread: what it needs is unknown, GC keeps all
        assert named in swept.stdout + swept.stderr, swept
        assert (t.root / "composefs/images" / a).exists()
    else:
        assert not (t.root / "composefs/images" / a).exists()
    checked = fsck(t)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    human = s.status("humanreadable")
    problems = [line for line in human.stdout.splitlines() if line.startswith("Problem: ")]
    if case == "booted-origin-garbage":  # b is still booted, with its garbled .origin
        assert len(problems) == 1 and named in problems[0], human.stdout
    else:
        assert human.returncode == 0 and problems == [], human.stdout
