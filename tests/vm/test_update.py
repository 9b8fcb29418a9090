"""Update an installed system to another image and back, with nothing specific to the images:
the scenario `--image` and `--update-image` qualify a user's own pair with (harness.userimages;
without them, the built-in v1 and v2).

From the cached unified install of v1 (installed on the spot when the cache has none for this
image), over SSH:
1. `upgrade` stages v2 (pushed under the name v1 was installed from): `status` names the staged
   image with the registry's manifest digest (skopeo on the host); after the reboot `/` is the
   composefs mount of the staged id, `status` has v2 booted and v1 as rollback, each with its
   registry digest;
2. the new objects are zero-copy with the bootc store's files (what the kernel says: inode identity
   on ext4, FIEMAP-shared extents on btrfs/XFS), and the guest's own podman runs the booted image
   with no flags (`podman run --rm <ref> cat /usr/lib/os-release` = the booted root's);
3. `rollback` queues v1; after the reboot v1 is booted (its id and digest), v2 the rollback.
Per step: wall seconds, boots, disk use -> artifacts/vm/<test>/update-steps.json (the report).
"""

from __future__ import annotations

import pytest

from harness import installed
from harness.lifecycle import (
    Steps,
    disk_figures,
    entry_id,
    expect_status,
    objects,
    root_source_id,
    status,
    zero_copy_new,
)
from harness.pytest_vm import GuestImages, InstalledDiskFactory, VmFactory, artifacts_dir
from harness.registry import Registry, manifest_digest

# Not in ci/test (its checks are lifecycle's, which CI runs; ~12 min of a 2-core TCG host's CI):
# the qualification (`--scenario update`, `--image`/`--update-image`) and --scenarios all run it.
pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.sample("ext4"), pytest.mark.qualification_only]

OS = installed.variant_ref("v1")  # the name both images are pulled by (REFERENCES)
UPGRADE_TIMEOUT = 600


def host_view(pushed: str) -> str:
    return pushed.replace("10.0.2.2:", "127.0.0.1:", 1)


def test_update(
    fs_kind: str,
    installed_disk_factory: InstalledDiskFactory,
    vm_factory: VmFactory,
    guest_image: GuestImages,
    registry: Registry,
    request: pytest.FixtureRequest,
) -> None:
    fs = fs_kind
    v1_digest = manifest_digest(host_view(guest_image.push("v1", registry, installed.REFERENCES["v1"])))
    vm = vm_factory(installed_disk_factory("v1", fs, True))
    steps = Steps(vm, artifacts_dir(request) / "update-steps.json", "update", fs)
    users = [v for v in ("v1", "v2") if guest_image.is_user(v)]

    with steps.step("upgrade to v2, reboot") as facts:
        facts["images"] = {v: "user" if v in users else "built-in" for v in ("v1", "v2")}
        installed.map_test_registry(vm, registry.address)
        doc = expect_status(vm, booted=OS)
        v1_id = entry_id(doc["status"]["booted"])
        assert doc["status"]["booted"]["image"]["imageDigest"] == v1_digest
        before = objects(vm)
        guest_image.push("app", registry, installed.REFERENCES["app"])  # the built-in v2 binds it
        v2_digest = manifest_digest(host_view(guest_image.push("v2", registry, installed.REFERENCES["v2"])))
        assert v2_digest != v1_digest, "--update-image is the installed image itself"
        out = vm.run(["bootc-unified", "upgrade"], timeout=vm.timeout(UPGRADE_TIMEOUT)).stdout
        assert "Pull path: unified" in out, out
        doc = expect_status(vm, booted=OS, staged=OS)
        assert doc["status"]["staged"]["image"]["imageDigest"] == v2_digest
        v2_id = entry_id(doc["status"]["staged"])
        vm.reboot()
        doc = expect_status(vm, booted=OS, rollback=OS)
        assert (entry_id(doc["status"]["booted"]), entry_id(doc["status"]["rollback"])) == (v2_id, v1_id)
        assert doc["status"]["booted"]["image"]["imageDigest"] == v2_digest
        assert doc["status"]["rollback"]["image"]["imageDigest"] == v1_digest
        facts.update(v1=v1_id, v2=v2_id)

    with steps.step("zero-copy, podman run the booted image") as facts:
        facts["zero_copy"] = zero_copy_new(vm, fs, before)
        facts.update(disk_figures(vm, OS))
        os_release = vm.run(["podman", "run", "--rm", OS, "cat", "/usr/lib/os-release"]).stdout
        assert os_release == vm.run(["cat", "/usr/lib/os-release"]).stdout, os_release

    with steps.step("rollback, reboot") as facts:
        vm.run(["bootc-unified", "rollback"])
        expect_status(vm, booted=OS, rollback=OS, rollback_queued=True)
        vm.reboot()
        doc = expect_status(vm, booted=OS, rollback=OS)
        assert root_source_id(vm) == v1_id
        assert entry_id(doc["status"]["rollback"]) == v2_id
        assert doc["status"]["booted"]["image"]["imageDigest"] == v1_digest
        facts["booted"] = entry_id(status(vm)["status"]["booted"])
    vm.poweroff()
