"""`image set-unified` on a system installed without unified storage, then a soft-reboot upgrade
(issue 10, scenarios 5 and 6), one VM per filesystem.

From the cached *direct* install of v1 (origin bootc-unified.test/os:latest, mapped to this
session's registry where os:latest is v1):
- before: the booted image is in no store the guest's podman reads, so `podman run --pull=never
  <booted image>` fails ("image not known"; without --pull=never podman would pull it through the
  mapping and prove nothing);
- `image set-unified`; the root filesystem's used bytes before and after (`df -B1 /sysroot`)
  are measured and printed; afterwards `podman run <booted image>` works with no flags (and did
  not pull), and every object of the repository shares its data with a store file (the zero-copy
  audit: set-unified does not leave the image on disk twice);
- v2 pushed as os:latest (a userspace-only change: same kernel, initramfs and kargs);
  `upgrade --apply --soft-reboot=auto` says `Pull path: unified` and soft-reboots: same boot_id,
  SoftRebootsCount + 1, v2 booted with v1 as rollback, then every after-boot check.
Per step: wall seconds, boots, disk used -> artifacts/vm/<test>/set-unified-steps.json; after
set-unified also the report's disk figures (harness.lifecycle.disk_figures).
"""

from __future__ import annotations

import pytest

from harness import installed
from harness.installed import REFERENCES, variant_ref
from harness.lifecycle import (
    Steps,
    after_boot,
    apply_and_reconnect,
    df_used,
    disk_figures,
    entry_id,
    expect_status,
    objects,
)
from harness.pytest_vm import GuestImages, InstalledDiskFactory, VmFactory, artifacts_dir
from harness.registry import Registry

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.sample("xfs")]

OS = variant_ref("v1")


def test_set_unified_vm(
    fs_kind: str,
    installed_disk_factory: InstalledDiskFactory,
    vm_factory: VmFactory,
    guest_image: GuestImages,
    registry: Registry,
    request: pytest.FixtureRequest,
) -> None:
    fs = fs_kind
    for variant in ("v1", "v2", "app"):  # built from one state of the working tree
        guest_image(variant)
    disk = installed_disk_factory("v1", fs, False)
    vm = vm_factory(disk)
    steps = Steps(vm, artifacts_dir(request) / "set-unified-steps.json", "set-unified", fs)

    with steps.step("boot v1 (not unified)") as facts:
        installed.map_test_registry(vm, registry.address)
        guest_image.push("v1", registry, REFERENCES["v1"])  # set-unified may re-pull the origin
        doc = expect_status(vm, booted=OS)
        assert doc["status"]["booted"]["unified"] is False, doc["status"]["booted"]
        v1_id = entry_id(doc["status"]["booted"])
        run = vm.run(["podman", "run", "--pull=never", "--rm", OS, "true"], check=False)
        assert not run.ok, run
        facts["podman_run_before"] = run.stderr.strip()[-300:]

    with steps.step("image set-unified") as facts:
        used_before = df_used(vm)
        got = vm.run(["bootc-unified", "image", "set-unified"], timeout=vm.timeout(600))
        used_after = df_used(vm)
        facts.update(
            output=(got.stdout + got.stderr)[-2000:],
            used_before=used_before,
            used_after=used_after,
            added=used_after - used_before,
        )
        print(
            f"{fs}: set-unified: /sysroot used {used_before / 1e6:.0f} MB -> {used_after / 1e6:.0f} MB "
            f"({(used_after - used_before) / 1e6:+.1f} MB)"
        )
        facts.update(after_boot(vm, fs, set(), booted=OS))  # podman run works; all objects shared
        doc = expect_status(vm, booted=OS)
        assert doc["status"]["booted"]["unified"] is True, doc["status"]["booted"]
        facts.update(disk_figures(vm, OS))  # the report's disk chart: the store, deduped

    with steps.step("upgrade --soft-reboot=auto to v2") as facts:
        guest_image.push("v2", registry, REFERENCES["v2"])
        guest_image.push("app", registry, REFERENCES["app"])  # v2's bound image
        before = objects(vm)
        kind, out = apply_and_reconnect(
            vm, ["bootc-unified", "upgrade", "--apply", "--soft-reboot=auto"], "soft-upgrade"
        )
        facts.update(reboot=kind, output=out[-2000:])
        assert "Pull path: unified" in out, out
        assert kind == "soft", out
        facts.update(after_boot(vm, fs, before, booted=OS, rollback=OS))
        doc = expect_status(vm, booted=OS, rollback=OS)
        assert entry_id(doc["status"]["rollback"]) == v1_id != entry_id(doc["status"]["booted"])
        assert doc["status"]["booted"]["pullPath"] == "unified", doc["status"]["booted"]
        assert vm.run(["cat", "/usr/lib/bootc-unified/version"]).stdout == "v2\n"
    vm.poweroff()
