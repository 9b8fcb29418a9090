"""The update lifecycle on one installed system per filesystem (issue 10, scenarios 1-4), one VM
for the whole chain: v1 -> upgrade v2 -> switch alt -> gc -> rollback -> staged drop -> upgrade.

Starts from the cached unified install of v1, whose origin follows `bootc-unified.test/os:latest`
(harness.installed); the guest maps that prefix to this session's registry first, and podman in
the guest is seen pulling through the mapping (digest equal to skopeo's on the host).

1. upgrade: /etc/bootc-unified/local.conf modified locally; v2 pushed as os:latest; `upgrade
   --progress-fd 3` fetches only v2's new layer (the pull's progress JSON: every other layer
   cached) and says `Pull path: unified`; staged != booted; v2's bound app image is in the bootc
   store before the reboot. Reboot: v2 booted, v1 rollback; v2's added/changed/removed files; the
   local /etc change kept, the untouched file updated; the LBI runs with the guest's podman.
2. switch to bootc-unified.test/alt:latest -> reboot: alt booted, v2 rollback; origin and
   spec.image name alt; alt's LBI (app2) runs.
3. gc (finalize's at that reboot, then `internals gc` twice): v1's store image, EROFS image (its
   object), ref, state dir gone, kernel dirs = the live entries'; the store/repository/state
   bytes drop by about v1's unique bytes; a second run removes nothing; every file of the
   booted root reads back.
4. podman#20603: `podman build` FROM alt (the booted image) into the system store, and `podman
   pull` of alt's content under another name: no layer is copied into the system store.
5. rollback: rollbackQueued + bootOrder rollback -> reboot: v2 booted, alt rollback.
6. staged drop: os:latest now v1's content; `upgrade` stages it, `rollback` drops it (and queues
   alt), `rollback` again reverts; `upgrade` again -> reboot: it boots, v2 rollback, alt is no
   longer live, yet GC kept alt's store image because the derived image stands on it (`image
   list --type all --format json` says so) and the derived and the pulled image still run.

After every reboot (harness.lifecycle.after_boot): new boot_id, status slots, no failed units,
`podman run <booted image>` with no flags, zero-copy audit of every new object, console clean.
Per step: wall seconds, boots, disk used -> artifacts/vm/<test>/lifecycle-steps.json.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from harness import installed
from harness.installed import REFERENCES, variant_ref
from harness.lifecycle import (
    BOOTC_STORE,
    LOG_DIR,
    REPO,
    SYSTEM_STORE,
    Steps,
    after_boot,
    all_names,
    disk_figures,
    du_bytes,
    entry_id,
    expect_status,
    layer_ids,
    mount_esp,
    objects,
    read_progress,
    store_names,
)
from harness.pytest_vm import GuestImages, InstalledDiskFactory, VmFactory, artifacts_dir
from harness.registry import Registry, manifest_digest
from harness.vm import Machine

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.sample("ext4")]

OS, ALT, APP, APP2 = (variant_ref(v) for v in ("v1", "alt", "app", "app2"))
ALT_COPY_REF = "alt-copy:latest"  # alt's content under a name no deployment follows
ALT_COPY = installed.registry_ref(ALT_COPY_REF)
VERSION_FILE = "/usr/lib/bootc-unified/version"
# what v1 -> v2 changes under /usr/share/bootc-unified (images/guest/v2.toml)
V2_FILES = {
    "added-in-v2.txt": "new in v2\n",
    "changed.txt": "changed: v2\n",
    "unchanged.txt": "the same in v1 and v2\n",
}
UPGRADE_TIMEOUT = 180  # seconds on KVM; x10 under TCG


def cat(vm: Machine, path: str) -> str:
    return vm.run(["cat", path]).stdout


def run_verb(vm: Machine, *argv: str) -> str:
    """A bootc-unified verb, its stdout and stderr together (both carry messages)."""
    got = vm.run(["bootc-unified", *argv], timeout=vm.timeout(UPGRADE_TIMEOUT))
    return got.stdout + got.stderr


def verb_json(vm: Machine, *argv: str) -> Any:
    return json.loads(vm.run(["bootc-unified", *argv], timeout=vm.timeout(UPGRADE_TIMEOUT)).stdout)


def esp_dir(vm: Machine) -> str:
    return mount_esp(vm)


def live_kernel_dirs(vm: Machine) -> tuple[set[str], set[str]]:
    """(kernel dirs named by `linux` lines of loader/entries*, kernel dirs on the ESP)."""
    esp = esp_dir(vm)
    lines = vm.run(
        f"cat {esp}/loader/entries/*.conf {esp}/loader/entries.staged/*.conf 2>/dev/null; true"
    ).stdout
    named = {
        line.split()[1].strip("/").split("/")[-2] for line in lines.splitlines() if line.startswith("linux ")
    }
    present = set(vm.run(f"ls {esp}/EFI/Linux").stdout.split())
    return named, present


def lbi_runs(vm: Machine, ref: str, want: str) -> None:
    """`ref` is in the bootc store (its images.json), not in the system store, and the guest's
    podman runs it from there."""
    assert ref in all_names(vm, BOOTC_STORE), (ref, store_names(vm, BOOTC_STORE))
    assert ref not in all_names(vm, SYSTEM_STORE), ref
    out = vm.run(["podman", "run", "--rm", ref, "cat", "/etc/app/version"], timeout=vm.timeout(300)).stdout
    assert out == want, out
    assert ref not in all_names(vm, SYSTEM_STORE), f"podman pulled {ref} into the system store"
    logical = json.loads(
        vm.run(["bootc-unified", "image", "list", "--type", "logical", "--format", "json"]).stdout
    )
    assert ref in {row["image"] for row in logical}, logical


def test_lifecycle(
    fs_kind: str,
    installed_disk_factory: InstalledDiskFactory,
    vm_factory: VmFactory,
    guest_image: GuestImages,
    registry: Registry,
    request: pytest.FixtureRequest,
) -> None:
    fs = fs_kind
    # every image first, so all are built from one state of the working tree (the os layer carries it)
    v1, v2, *_ = (guest_image(v) for v in ("v1", "v2", "alt", "app", "app2"))
    disk = installed_disk_factory("v1", fs, True)
    vm = vm_factory(disk)
    steps = Steps(vm, artifacts_dir(request) / "lifecycle-steps.json", "lifecycle", fs)

    with steps.step("boot v1, map the registry") as facts:
        facts["boot_to_ssh"] = round(vm.timings.boots_to_ssh[-1], 1)
        installed.map_test_registry(vm, registry.address)
        guest_image.push("app", registry, REFERENCES["app"])
        vm.run(["podman", "pull", "--quiet", APP], timeout=vm.timeout(300))
        pulled = vm.run(["podman", "image", "inspect", "--format", "{{.Digest}}", APP]).stdout.strip()
        assert pulled == manifest_digest(f"{registry.address}/{REFERENCES['app']}"), pulled
        vm.run(["podman", "rmi", APP])  # the LBI checks need it only in the bootc store
        facts.update(after_boot(vm, fs, set(), booted=OS))
        v1_id = facts["booted"]
        v1_store_ids = [i for i, names in store_names(vm, BOOTC_STORE).items() if OS in names]
        assert len(v1_store_ids) == 1, store_names(vm, BOOTC_STORE)
        vm.run("echo 'setting = local' > /etc/bootc-unified/local.conf")
        facts.update(disk_figures(vm, OS))  # the report's disk chart: v1 installed unified

    # 1. upgrade v1 -> v2 ------------------------------------------------------------------------------
    with steps.step("upgrade (stage v2)") as facts:
        guest_image.push("v2", registry, REFERENCES["v2"])
        before = objects(vm)
        progress = f"{LOG_DIR}/upgrade.jsonl"
        vm.run(["mkdir", "-p", LOG_DIR])
        got = vm.run(
            f"bootc-unified upgrade --progress-fd 3 3>{progress}", timeout=vm.timeout(UPGRADE_TIMEOUT)
        )
        out = got.stdout + got.stderr
        facts["output"] = out[-2000:]
        assert "Pull path: unified" in out, out
        events = read_progress(vm, progress)
        assert events[0] == {"type": "Start", "version": "0.1.0"}, events[0]
        pulls = [e for e in events if e["type"] == "ProgressBytes" and OS in e["id"]]
        assert pulls, [e for e in events if e["type"] != "Start"][:5]
        pull = pulls[-1]
        facts["pull"] = {
            k: pull[k] for k in ("bytesCached", "bytes", "bytesTotal", "stepsCached", "stepsTotal")
        }
        assert (pull["stepsTotal"], pull["stepsCached"]) == (len(v2.layers), len(v1.layers)), facts["pull"]
        fetched = pull["bytesTotal"] - pull["bytesCached"]
        assert pull["bytesCached"] > 100 * fetched and fetched > 0, facts["pull"]
        doc = expect_status(vm, booted=OS, staged=OS)
        staged, booted = doc["status"]["staged"], doc["status"]["booted"]
        assert entry_id(staged) != entry_id(booted) == v1_id
        assert staged["image"]["imageDigest"] == manifest_digest(f"{registry.address}/{REFERENCES['v2']}")
        assert APP in all_names(vm, BOOTC_STORE), "v2's bound image was not pulled before staging"
        v2_id = entry_id(staged)

    with steps.step("reboot into v2") as facts:
        vm.reboot()
        facts.update(after_boot(vm, fs, before, booted=OS, rollback=OS))
        doc = expect_status(vm, booted=OS, rollback=OS)
        assert (entry_id(doc["status"]["booted"]), entry_id(doc["status"]["rollback"])) == (v2_id, v1_id)
        share = "/usr/share/bootc-unified"
        listed = set(vm.run(["ls", share]).stdout.split())
        assert listed == set(V2_FILES), listed  # removed-in-v2.txt is gone
        assert {name: cat(vm, f"{share}/{name}") for name in V2_FILES} == V2_FILES
        assert cat(vm, "/etc/bootc-unified/local.conf") == "setting = local\n"  # local change kept
        assert cat(vm, "/etc/bootc-unified/untouched.conf") == "setting = v2\n"  # untouched: updated
        lbi_runs(vm, APP, "app v1\n")

    # 2. switch to alt ---------------------------------------------------------------------------------
    esp = esp_dir(vm)
    with steps.step("switch (stage alt)") as facts:
        guest_image.push("alt", registry, REFERENCES["alt"])
        guest_image.push("app2", registry, REFERENCES["app2"])
        before = objects(vm)
        out = run_verb(vm, "switch", ALT)
        facts["output"] = out[-2000:]
        assert "Pull path: unified" in out, out
        doc = expect_status(vm, booted=OS, staged=ALT, rollback=OS)
        assert doc["spec"]["image"]["image"] == ALT, doc["spec"]
        alt_id = entry_id(doc["status"]["staged"])
        # what GC should take at the reboot (v1 leaves the menu when finalize swaps the entries)
        v1_image = vm.run(["readlink", "-f", f"{REPO}/images/{v1_id}"]).stdout.strip()
        v1_unique = du_bytes(vm, v1_image, f"/sysroot/state/deploy/{v1_id}")
        kept_paths = (REPO, BOOTC_STORE, "/sysroot/state/deploy")
        du_before = du_bytes(vm, *kept_paths)
        facts.update(v1_unique=v1_unique, du_before=du_before)

    with steps.step("reboot into alt") as facts:
        vm.reboot()
        facts.update(after_boot(vm, fs, before, booted=ALT, rollback=OS))
        doc = expect_status(vm, booted=ALT, rollback=OS)
        assert (entry_id(doc["status"]["booted"]), entry_id(doc["status"]["rollback"])) == (alt_id, v2_id)
        assert doc["spec"]["image"]["image"] == ALT
        origin = cat(vm, f"/sysroot/state/deploy/{alt_id}/{alt_id}.origin")
        assert ALT in origin and OS not in origin, origin
        assert cat(vm, "/usr/lib/bootc-unified/version") == "alt\n"
        lbi_runs(vm, APP2, "app2\n")

    # 3. gc ------------------------------------------------------------------------------------------------
    with steps.step("gc after v1 -> v2 -> alt") as facts:
        report = verb_json(vm, "internals", "gc", "--format", "json")
        again = verb_json(vm, "internals", "gc", "--format", "json")
        facts["gc"] = {k: report[k] for k in ("removed_deployments", "removed_kernel_dirs", "removed_refs")}
        for key in ("removed_deployments", "removed_kernel_dirs", "removed_images", "removed_refs"):
            assert again[key] == [], (key, again)
        assert not again["repository"].get("removed_objects"), again["repository"]
        gone = vm.run(
            ["ls", "-d", f"{REPO}/images/{v1_id}", v1_image, f"/sysroot/state/deploy/{v1_id}"], check=False
        )
        assert gone.stdout == "", gone.stdout  # v1's EROFS image, its object and state dir
        ids = set(store_names(vm, BOOTC_STORE))
        assert not ids & set(v1_store_ids), store_names(vm, BOOTC_STORE)
        named, present = live_kernel_dirs(vm)
        assert named == present, (named, present)
        du_after = du_bytes(vm, *kept_paths)
        facts.update(du_after=du_after, du_drop=du_before - du_after)
        # finalize wrote alt's merged /etc in between: a few KiB
        assert abs((du_before - du_after) - v1_unique) <= max(v1_unique // 5, 4 << 20), facts
        # every file of the booted root reads back (its objects are all there)
        vm.run("find / -xdev -type f -print0 | xargs -0 cat > /dev/null", timeout=vm.timeout(900))
        assert vm.run(["ls", esp]).ok

    # 4. podman#20603: an image built FROM the booted image into the system store --------------------------
    with steps.step("podman build FROM alt") as facts:
        vm.run(
            f"mkdir -p {LOG_DIR}/derived && printf 'FROM {ALT}\\nRUN echo derived > /derived.txt\\n' "
            f"> {LOG_DIR}/derived/Containerfile"
        )
        vm.run(
            [
                "podman",
                "build",
                "--pull=never",
                "--network=none",
                "-t",
                "localhost/derived:latest",
                f"{LOG_DIR}/derived",
            ],
            timeout=vm.timeout(300),
        )
        assert "localhost/derived:latest" in all_names(vm, SYSTEM_STORE)
        assert ALT not in all_names(vm, SYSTEM_STORE)  # its base stays in the bootc store
        out = vm.run(["podman", "run", "--rm", "localhost/derived:latest", "cat", "/derived.txt"]).stdout
        assert out == "derived\n", out
        # ... and an image pulled into the system store that shares every layer with alt (alt's content
        # under another name): podman finds the layers in the additional store and does not fetch them
        guest_image.push("alt", registry, ALT_COPY_REF)
        vm.run(["podman", "pull", "--quiet", ALT_COPY], timeout=vm.timeout(300))
        assert ALT_COPY in all_names(vm, SYSTEM_STORE)
        copied = sorted(layer_ids(vm, SYSTEM_STORE) & layer_ids(vm, BOOTC_STORE))
        facts["layers_copied_into_system_store"] = copied
        assert not copied, "podman copied layers the bootc store has"
        alt_copy_version = vm.run(["podman", "run", "--rm", ALT_COPY, "cat", VERSION_FILE]).stdout
        assert alt_copy_version == "alt\n", alt_copy_version

    # 5. rollback ------------------------------------------------------------------------------------------
    with steps.step("rollback, reboot into v2") as facts:
        run_verb(vm, "rollback")
        doc = expect_status(vm, booted=ALT, rollback=OS, rollback_queued=True)
        assert doc["spec"]["bootOrder"] == "rollback", doc["spec"]
        vm.reboot()
        facts.update(after_boot(vm, fs, objects(vm), booted=OS, rollback=ALT))
        doc = expect_status(vm, booted=OS, rollback=ALT)
        assert (entry_id(doc["status"]["booted"]), entry_id(doc["status"]["rollback"])) == (v2_id, alt_id)
        assert cat(vm, "/usr/lib/bootc-unified/version") == "v2\n"
        lbi_runs(vm, APP, "app v1\n")

    # 6. a staged deployment dropped by rollback, then booted ------------------------------------------------
    with steps.step("upgrade, rollback drops the staged") as facts:
        guest_image.push("v1", registry, REFERENCES["v1"])  # os:latest is v1's content again
        before = objects(vm)
        facts["output"] = run_verb(vm, "upgrade")[-2000:]
        doc = expect_status(vm, booted=OS, staged=OS, rollback=ALT)
        again_id = entry_id(doc["status"]["staged"])
        assert again_id not in (v2_id, alt_id)
        run_verb(vm, "rollback")
        expect_status(vm, booted=OS, rollback=ALT, rollback_queued=True)
        run_verb(vm, "rollback")  # reverts the queued rollback
        expect_status(vm, booted=OS, rollback=ALT)

    with steps.step("upgrade again, reboot: alt no longer live") as facts:
        run_verb(vm, "upgrade")
        expect_status(vm, booted=OS, staged=OS, rollback=ALT)
        vm.reboot()
        facts.update(after_boot(vm, fs, before, booted=OS, rollback=OS))
        doc = expect_status(vm, booted=OS, rollback=OS)
        assert (entry_id(doc["status"]["booted"]), entry_id(doc["status"]["rollback"])) == (again_id, v2_id)
        assert cat(vm, "/usr/lib/bootc-unified/version") == "v1\n"
        run_verb(vm, "internals", "gc")
        rows = verb_json(vm, "image", "list", "--type", "all", "--format", "json")
        facts["image_list"] = rows
        alt_rows = [r for r in rows if r["image"] == ALT and r["image_type"] == "unified"]
        assert alt_rows and any("system-store image" in why for why in alt_rows[0]["kept_because"]), rows
        out = vm.run(["podman", "run", "--rm", "localhost/derived:latest", "cat", "/derived.txt"]).stdout
        assert out == "derived\n", out
        out = vm.run(["podman", "run", "--rm", ALT_COPY, "cat", VERSION_FILE]).stdout
        assert out == alt_copy_version, out
        facts.update(disk_figures(vm, OS))  # the report's disk chart: after the lifecycle and its GC
    print(json.dumps([(r.name, r.seconds, r.boots, r.disk_used) for r in steps.records]))
    vm.poweroff()
