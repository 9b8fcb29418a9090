"""Power cuts during an update (issue 12, R2), one VM per filesystem, every cut in the same VM.

Starts from the cached unified install of v1. A baseline first: upgrade to a derived image
(v2 + one layer of random files, harness.powercut.derived_image) timed end to end (D), then a clean
reboot that times finalize (F) and boots it. Then the cuts, each on a new derived image:

- "upgrade": `bootc-unified upgrade` started, the VM destroyed at a random time in [0, 1.1 D];
  it must boot the deployment that was booted before (nothing was finalized).
- "finalize": `systemctl reboot` with the re-run upgrade staged, the VM destroyed at a random time
  in [0, F] after the finalize unit's "Stopping" line; it boots the old or the new deployment.

After every cut (harness.powercut.check_whole): booted = `/`'s composefs source and one of the
allowed deployments, no staged deployment, BLS entries = booted + rollback and each names an
existing image and state dir, no failed unit, console clean, `fsck` of the repository clean (after
bootc-unified-recover.service removed what an interrupted import left damaged; its line is kept
as a fact, like the ESP check's), `fsck.fat -n` of the ESP clean, `image list` names the booted
image; then `upgrade` is re-run and must stage the image (or say the booted one is current).

How many cuts: `--scenarios sample` (CI) one of each kind; `--scenarios all` / the qualification
four upgrade cuts and two finalize cuts per filesystem (12 and 6 over btrfs, XFS and ext4);
BOOTC_UNIFIED_POWER_CUTS="U,F" sets both. The random seed is printed and kept in the step records
(BOOTC_UNIFIED_POWER_CUT_SEED replays a run's draws). BOOTC_UNIFIED_POWER_CUT_FINALIZE="LO,HI"
draws the finalize cuts in that part of the measured finalize (fractions, default 0,1): a targeted
series, e.g. "0.25,0.6" around the entries swap, where a cut once left FAT with no boot entry.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict

import pytest

from harness import installed
from harness.installed import REFERENCES, variant_ref
from harness.lifecycle import Steps, entry_id, expect_status, status
from harness.powercut import (
    Cut,
    check_whole,
    cut_finalize,
    cut_upgrade,
    derived_image,
    reboot_watching_finalize,
    remove_image,
)
from harness.pytest_vm import GuestImages, InstalledDiskFactory, VmFactory, artifacts_dir
from harness.registry import Registry
from harness.vm import Machine

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.sample("ext4")]

OS = variant_ref("v1")
UPGRADE_TIMEOUT = 180  # seconds on KVM; x10 under TCG


def finalize_window() -> tuple[float, float]:
    lo, hi = (float(x) for x in (os.environ.get("BOOTC_UNIFIED_POWER_CUT_FINALIZE") or "0,1").split(","))
    return lo, hi


def cut_counts(config: pytest.Config) -> tuple[int, int]:
    override = os.environ.get("BOOTC_UNIFIED_POWER_CUTS")
    if override:
        upgrade, finalize = (int(x) for x in override.split(","))
        return upgrade, finalize
    return (1, 1) if config.getoption("--scenarios") == "sample" else (4, 2)


def upgrade(vm: Machine) -> str:
    got = vm.run(["bootc-unified", "upgrade"], timeout=vm.timeout(UPGRADE_TIMEOUT))
    return got.stdout + got.stderr


def staged_id(vm: Machine) -> str:
    staged = status(vm)["status"]["staged"]
    assert staged is not None, "upgrade staged nothing"
    found = entry_id(staged)
    assert found is not None
    return found


def test_power_cut(
    fs_kind: str,
    installed_disk_factory: InstalledDiskFactory,
    vm_factory: VmFactory,
    guest_image: GuestImages,
    registry: Registry,
    request: pytest.FixtureRequest,
) -> None:
    fs = fs_kind
    upgrades, finalizes = cut_counts(request.config)
    seed = int(os.environ.get("BOOTC_UNIFIED_POWER_CUT_SEED") or time.time_ns() % 1_000_000)
    rng = random.Random(seed)
    print(f"power cuts on {fs}: {upgrades} during upgrade, {finalizes} during finalize, seed {seed}")
    _, v2, _ = guest_image("v1"), guest_image("v2"), guest_image("app")
    builder = guest_image.builder
    disk = installed_disk_factory("v1", fs, True)
    vm = vm_factory(disk)
    # what the kernel says when bootc-unified-recover.service opens an object a cut left damaged
    # (btrfs: name and fs-verity descriptor kept, data lost) before removing it
    vm.expect_console_lines(
        r"fs-verity \(vd[a-z]\d+, inode \d+\): Wrong data_size: \d+ \(desc\) != \d+ \(inode\)$"
    )
    steps = Steps(vm, artifacts_dir(request) / "power-cut-steps.json", "power-cut", fs)
    cuts: list[Cut] = []
    tags: list[str] = []

    def push_trial(n: int) -> None:
        tag = derived_image(builder, v2, n)
        tags.append(tag)
        guest_image.push_derived(tag, registry, REFERENCES["v1"])

    try:
        with steps.step("baseline: upgrade, clean reboot") as facts:
            facts["seed"] = seed
            installed.map_test_registry(vm, registry.address)
            guest_image.push("app", registry, REFERENCES["app"])  # v2 binds it
            booted = entry_id(status(vm)["status"]["booted"])
            assert booted is not None
            push_trial(0)
            started = time.monotonic()
            upgrade(vm)
            duration = time.monotonic() - started
            new = staged_id(vm)
            finalize = reboot_watching_finalize(vm)
            expect_status(vm, booted=OS, rollback=OS)
            facts.update(upgrade_seconds=round(duration, 1), finalize_seconds=round(finalize, 1))
            facts.update(check_whole(vm, {new: "new"}))
            booted = new

        order: list[str] = []  # alternating while both kinds remain: U F U F U U
        for i in range(max(upgrades, finalizes)):
            order += ["upgrade"] * (i < upgrades) + ["finalize"] * (i < finalizes)
        staged: str | None = None
        for n, kind in enumerate(order, start=1):
            with steps.step(f"cut {n}: {kind}") as facts:
                if kind == "upgrade":
                    push_trial(n)
                    cut = Cut(
                        kind, round(rng.uniform(0, 1.1 * duration), 1), round(1.1 * duration, 1), booted, ""
                    )
                    cut_upgrade(vm, cut, f"cut-{n}")
                    allowed = {booted: "old"}
                else:
                    if staged is None:  # finalize needs something staged
                        push_trial(n)
                        upgrade(vm)
                        staged = staged_id(vm)
                    lo, hi = finalize_window()
                    at = round(rng.uniform(lo * finalize, hi * finalize), 1)
                    cut = Cut(kind, at, round(finalize, 1), booted, staged)
                    cut_finalize(vm, cut)
                    allowed = {booted: "old", staged: "new"}
                found = check_whole(vm, allowed)
                cut.booted_after, cut.outcome, cut.fsck = found["booted"], found["outcome"], found["fsck"]
                cut.esp, cut.recovered = found["esp"], found["recovered"]
                booted = cut.booted_after
                # the interrupted update, re-run
                out = upgrade(vm)
                st = status(vm)["status"]
                staged = entry_id(st["staged"])
                assert staged is not None or "No changes" in out or "no update" in out.lower(), out
                cuts.append(cut)
                facts["cut"] = asdict(cut)
                facts["rerun"] = out.strip().splitlines()[-1:] if out.strip() else []
    finally:
        for tag in tags:
            try:
                remove_image(builder, tag)
            except Exception as e:  # the build store prunes itself later; the result stands
                print(f"could not remove {tag}: {e}")
        table = [asdict(c) for c in cuts]
        (artifacts_dir(request) / "power-cuts.json").write_text(
            json.dumps({"seed": seed, "fs": fs, "cuts": table}, indent=2)
        )
        for c in cuts:
            print(
                f"{fs:<6} {c.kind:<9} at {c.at:6.1f}/{c.window:6.1f}s finished={c.finished_before_cut!s:<5} "
                f"-> {c.outcome:<3} boot {c.boot_seconds:5.1f}s  {c.progress[:60]}"
            )
    assert len(cuts) == upgrades + finalizes
    vm.poweroff()
