"""Crash injection across the update lifecycle (issue 12, R1): real SIGKILLs on a loop sysroot
(btrfs/XFS/ext4), at named crash points (bootc_unified/faults.py) and at random times within each
verb's measured duration, in every step of the chain

    install v1 (unified) -> upgrade to v2 (pull, import, EROFS build, stage, GC) -> finalize-staged
    -> upgrade to v3 (booted v2) -> rollback (drops v3) -> internals gc (v3's leftovers)
    and, on a second sysroot installed without the bootc store, image set-unified (pull + dedupe).

Each crash starts from the same saved state (harness/crashcheck.py `Sandbox`). After EACH crash
(harness/crashcheck.py `invariants`): the repository's fsck passes; every ref resolves; every BLS
entry names an EROFS image, a state dir and kernel files that exist; the staged marker is absent or
names a complete staging; `status --format json` shows the booted deployment; podman (its own
configuration) still lists the live images the store held. Then the verb is run again, and its end
state must equal that of an uninterrupted run (harness/crashcheck.py `fingerprint`: ESP and state
dirs byte for byte, the marker, refs, the set of object names, podman's list of the store).

The named points are spread over the filesystems (point i on filesystem i mod 3) to keep CI short;
BOOTC_UNIFIED_CRASH_ALL=1 runs every point on every filesystem. Random delays are seeded by the
filesystem's name (printed). The table of verb x point x outcome is printed, saved as
artifacts/crash/lifecycle-<fs>.json and summed up at the end of the run (tests/storage/conftest.py).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from harness.loopfs import KINDS, LoopFs
from harness.pytest_plugin import require
from harness.registry import Registry
from harness.run import run
from harness.testimages import Buildah, push
from harness.testimages import missing_prerequisites as images_missing
from testsupport import bootimages as ti
from testsupport.crashcheck import (
    Outcome,
    Sandbox,
    Tally,
    differences,
    fingerprint,
    invariants,
    menu_order,
    run_killed,
    store_digests,
)
from testsupport.plugin import run_cli

pytestmark = pytest.mark.storage

OTHER_KERNEL = {
    f"usr/lib/modules/{ti.KVER}/vmlinuz": ti.blob("vmlinuz-crash", 150_000),
    f"usr/lib/modules/{ti.KVER}/initramfs.img": ti.blob("initramfs-crash", 60_000),
}

# Named points per verb ("name:n" = the n-th time it is reached).
UPGRADE_POINTS = [
    "object-before-link:1",  # import: an object written, not yet linked
    "object-before-link:4",
    "object-after-link:2",
    "import-layer-entry:1",
    "import-layer-entry:6",
    "import-layer-before-publish:1",  # the layer's objects in, its stream not yet named
    "link-before-rename:1",  # a link under its temporary name
    "link-before-rename:3",
    "create-image-before-store:1",  # EROFS image built, not yet stored
    "import-after-config:1",
    "import-after-manifest:1",
    "import-after-ref:1",  # published; nothing staged
    "update-after-import:1",
    "update-before-stage:1",
    "stage-after-drop:1",
    "stage-after-kernel:1",  # kernel dir there, no state dir, no entry
    "stage-after-state:1",  # state dir there, no entry
    "stage-before-entries-rename:1",  # entries built in a temporary directory
    "stage-before-marker:1",  # entries.staged there, no marker
    "update-after-stage:1",  # staged; GC not run
]
FINALIZE_POINTS = [
    "finalize-after-merge:1",  # /etc merged, entries not swapped
    "entries-after-exchange:1",  # swapped, old set not deleted, marker still there
    "finalize-before-marker:1",
]
ROLLBACK_POINTS = [
    "rollback-after-drop-staged:1",  # marker and entries.staged gone, menu unchanged
    "rollback-before-rename:1",
    "rollback-before-swap:1",  # the new order in entries.staged
    "entries-after-exchange:1",  # the new order live, the old one in entries.staged
]
GC_POINTS = [
    "gc-state-dir:1",
    "gc-kernel-dir:1",
    "gc-before-rmi:1",
    "gc-after-rmi:1",  # store pruned, repository not
    "gc-stale-ref:1",
    "gc-stale-ref:2",
    "repo-gc-link:1",
    "repo-gc-link:3",
    "repo-gc-object:1",
    "repo-gc-object:6",
]
SET_UNIFIED_POINTS = {  # the method differs by filesystem
    "ext4": ["dedupe-before-rename:1", "dedupe-before-rename:4", "dedupe-after-rename:2"],
    "btrfs": ["dedupe-range:1", "dedupe-range:3", "dedupe-range:6"],
    "xfs": ["dedupe-range:1", "dedupe-range:3", "dedupe-range:6"],
}
RANDOM_KILLS = {"upgrade": 8, "finalize": 3, "rollback": 3, "gc": 5, "set-unified": 4}


@dataclass(frozen=True)
class Images:
    v1: ti.BootImage
    v2: ti.BootImage
    v3: ti.BootImage
    app: ti.BootImage  # not bootable: an image nothing roots, for the store's GC


@pytest.fixture(scope="session")
def crash_images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Images:
    """v1, v2 (same kernel, a new file and changed ones), v3 (another kernel), app (a tiny image)."""
    require(images_missing(), "building bootable test images")
    b = Buildah(tmp_path_factory.mktemp("crashimages"))
    out = {}
    try:
        specs = {
            "v1": ("1.0", {**ti.base_files("1.0"), **ti.KERNEL_FILES}),
            "v2": (
                "2.0",
                {**ti.base_files("2.0"), **ti.KERNEL_FILES, "usr/share/v2": ti.blob("v2", 90_000)},
            ),
            "v3": ("3.0", {**ti.base_files("3.0"), **OTHER_KERNEL}),
        }
        for name, (version, files) in specs.items():
            extra = {f"usr/lib/extra/f{i}": ti.blob(f"{name}-{i}", 3000 + i) for i in range(6)}
            ti.build(b, f"crash-{name}", version, {**files, **extra}, dirs=("sysroot",), etc_extras=True)
            ref, digest = push(b, f"crash-{name}", registry.address, "gzip")
            out[name] = ti.BootImage(f"crash-{name}", ref, digest, version)
        ti.build(b, "crash-app", "1", {"srv/app": ti.blob("crash-app", 5000)})
        ref, digest = push(b, "crash-app", registry.address, "gzip")
        out["app"] = ti.BootImage("crash-app", ref, digest, "1")
    finally:
        b.close()
    return Images(**out)


def retag(src: ti.BootImage, dest: str) -> None:
    run(
        [
            *("skopeo", "copy", "--quiet", "--preserve-digests"),
            *("--src-tls-verify=false", "--dest-tls-verify=false"),
            f"docker://{src.ref}",
            f"docker://{dest}",
        ]
    )


def mine(points: list[str], fs: str) -> list[str]:
    """The points this filesystem runs: every third, rotated (all with BOOTC_UNIFIED_CRASH_ALL=1)."""
    if os.environ.get("BOOTC_UNIFIED_CRASH_ALL") == "1":
        return points
    return [p for i, p in enumerate(points) if KINDS[i % len(KINDS)] == fs]


@dataclass
class Lifecycle:
    sb: Sandbox
    tally: Tally
    rng: random.Random

    def crash_all(
        self,
        verb: str,
        base: str,
        argv: list[str],
        booted: str,
        points: list[str],
        kills: int,
        settle: Callable[[], None] | None = None,
        end_check: Callable[[Outcome, Outcome, dict[str, object]], None] | None = None,
        with_store: bool = True,
    ) -> dict[str, object]:
        """From saved state `base`: one uninterrupted run (its duration and end state), then each
        named point and `kills` random-time kills, each followed by the invariants, a re-run and the
        end state compared with the uninterrupted one. `settle` runs after the (re-)run before the
        end state is taken (e.g. the GC an upgrade re-run skips). Returns the end state."""
        sb = self.sb
        sb.restore(base)
        store_kept = store_digests(sb)
        ref = run_killed(argv)
        assert ref.returncode == 0, f"{verb}: {ref.stderr}"
        if settle:
            settle()
        want = fingerprint(sb, with_store)
        sb.save(f"{base}-{verb}-done")
        # the duration: the shorter of two uninterrupted runs (one may be slowed by the other worker)
        sb.restore(base)
        seconds = min(ref.seconds, run_killed(argv).seconds)
        cases: list[tuple[str, str | None, float | None]] = [(p, p, None) for p in points]
        cases += [("random", None, self.rng.uniform(0, seconds)) for _ in range(kills)]
        for label, point, delay in cases:
            sb.restore(base)
            what = f"{verb} killed at {point or f'{delay:.2f} s'} on {self.tally.fs}"
            crashed = run_killed(argv, point=point, kill_after=delay)
            if point is not None:
                assert crashed.killed, f"{what}: not reached (rc {crashed.returncode}: {crashed.stderr})"
            else:
                assert crashed.returncode in (0, -9), f"{what}: {crashed.stderr}"
            outcome = "killed" if crashed.killed else "finished first"
            self.tally.add(verb, label, outcome)
            invariants(sb, booted, store_kept, what)
            again = run_killed(argv)
            assert again.returncode == 0, f"{what}, re-run: {again.stderr}"
            if settle:
                settle()
            if end_check is not None:
                end_check(crashed, again, want)
            else:
                got = fingerprint(sb, with_store)
                assert differences(want, got) == [], f"{what}, re-run: {differences(want, got)}"
        sb.restore(f"{base}-{verb}-done")
        return want


def test_crash_lifecycle(loopfs: LoopFs, crash_images: Images, registry: Registry) -> None:
    fs = loopfs.kind
    seed = f"crash-lifecycle-{fs}"
    life = Lifecycle(Sandbox(loopfs.path / "sys").create(), Tally(fs), random.Random(seed))
    sb = life.sb
    print(f"\nrandom delays seeded with {seed!r}")
    ref = f"{registry.address}/crash/{fs}/os:latest"
    retag(crash_images.v1, ref)
    t = ti.Target(loopfs, sb.root, sb.esp)
    ti.install(
        t, "--allow-missing-verity", "--experimental-unified-storage", "--source-imgref", f"docker://{ref}"
    )
    a = ti.deployment_id(t)
    sb.save("installed")

    def update_argv(booted: str) -> list[str]:
        return [
            "upgrade",
            *sb.system_args(booted),
            *("--etc", str(sb.root / "state/deploy" / booted / "etc")),
            *("--system-store", str(sb.base / "no-system-store"), "--no-systemd", "--tls-verify", "false"),
            "--quiet",
        ]

    def gc_argv(booted: str) -> list[str]:
        return ["internals", "gc", *sb.system_args(booted), "--system-store", str(sb.base / "no-system")]

    def settle_gc(booted: str) -> Callable[[], None]:
        return lambda: run_cli(*gc_argv(booted))

    # 1. upgrade to v2: pull, import, EROFS image, stage, GC
    retag(crash_images.v2, ref)
    sb.save("v2-tagged")
    points = mine(UPGRADE_POINTS, fs)
    life.crash_all("upgrade", "v2-tagged", update_argv(a), a, points, RANDOM_KILLS["upgrade"], settle_gc(a))
    b = json.loads(sb.marker.read_text())["depl_id"]
    assert b != a

    # 2. finalize (booted a): /etc merge, entries swapped, marker removed
    fin = ["internals", "finalize-staged", *sb.system_args(a)]
    fin += ["--etc", str(sb.root / "state/deploy" / a / "etc")]
    sb.save("staged")
    done = life.crash_all(
        "finalize", "staged", fin, a, mine(FINALIZE_POINTS, fs), RANDOM_KILLS["finalize"], with_store=False
    )
    assert done["marker"] is None and menu_order(sb) == [b, a]

    # 3. rebooted into b; upgrade to v3 (another kernel), then rollback drops it
    retag(crash_images.v3, ref)
    assert run_killed(update_argv(b)).returncode == 0
    c = json.loads(sb.marker.read_text())["depl_id"]
    sb.save("v3-staged")
    rollback = ["rollback", *sb.system_args(b)]

    def rollback_end(crashed: Outcome, again: Outcome, want: dict[str, object]) -> None:
        # rollback toggles: a re-run after the kill took effect reverts it
        order = menu_order(sb)
        if "Reverting queued rollback state" in again.stdout:
            assert order == [b, a], order
        else:
            assert differences(want, fingerprint(sb, with_store=False)) == []
        assert not sb.marker.exists() and not (sb.esp / "loader/entries.staged").exists()

    done = life.crash_all(
        "rollback",
        "v3-staged",
        rollback,
        b,
        mine(ROLLBACK_POINTS, fs),
        RANDOM_KILLS["rollback"],
        end_check=rollback_end,
        with_store=False,
    )
    assert menu_order(sb) == [a, b] and done["marker"] is None

    # 4. GC: v3's state dir, kernel dir, refs and objects go, and an image nothing roots (the store
    # keeps v3: it holds the name the origins follow)
    run_cli(
        "image", "pull", "--sysroot", sb.root, "--tls-verify", "false", f"docker://{crash_images.app.ref}"
    )
    sb.save("rolled-back")
    assert (sb.root / "state/deploy" / c).is_dir()
    assert crash_images.app.digest in store_digests(sb)
    gc_done = life.crash_all("gc", "rolled-back", gc_argv(b), b, mine(GC_POINTS, fs), RANDOM_KILLS["gc"])
    assert not (sb.root / "state/deploy" / c).exists()
    assert crash_images.app.digest not in gc_done["store"]  # type: ignore[operator]
    again = json.loads(run_cli(*gc_argv(b), "--format", "json").stdout)
    assert again["removed_deployments"] == [] and again["repository"]["removed_objects"] == 0

    # 5. set-unified on a system installed without the bootc store: pull by digest, dedupe
    su = Lifecycle(Sandbox(loopfs.path / "su").create(), life.tally, life.rng)
    retag(crash_images.v1, ref)
    t2 = ti.Target(loopfs, su.sb.root, su.sb.esp)
    ti.install(t2, "--allow-missing-verity", "--source-imgref", f"docker://{ref}")
    d = ti.deployment_id(t2)
    su.sb.save("plain")
    argv = ["image", "set-unified", "--sysroot", str(su.sb.root), "--tls-verify", "false"]
    argv += ["--mountinfo", str(su.sb.mountinfo(d)), "--format", "json"]

    def su_end(crashed: Outcome, again: Outcome, want: dict[str, object]) -> None:
        got = fingerprint(su.sb)
        assert differences(want, got) == [], differences(want, got)
        last = json.loads(run_cli(*argv).stdout)  # everything shareable is shared now
        assert last["source"] == "already-present" and last["dedupe"]["shared"]["files"] == 0
        assert last["dedupe"]["already_shared"] == shareable, last["dedupe"]

    su.sb.restore("plain")
    first = json.loads(run_cli(*argv).stdout)
    shareable = {
        k: first["dedupe"]["shared"][k] + first["dedupe"]["already_shared"][k] for k in ("files", "bytes")
    }
    assert shareable["files"] > 5
    kills = RANDOM_KILLS["set-unified"]
    su.crash_all("set-unified", "plain", argv, d, SET_UNIFIED_POINTS[fs], kills, end_check=su_end)

    table = life.tally.table()
    print(table)
    life.tally.save(f"lifecycle-{fs}")
    assert life.tally.crashes >= 20
