"""What the host kernel cannot show: a composefs repository with fs-verity, in the trixie guest
(kernel 6.12) on its ext4 (-O verity) and btrfs root.

- `cfs init` without --insecure succeeds (the probe finds fs-verity);
- `cfs add --zerocopy`: ext4 hardlinks the source after enabling verity on it, btrfs reflinks and
  enables verity on the clone; the object ID equals `fsverity measure` (kernel) and `fsverity digest`;
- an image pulled by the guest's podman imports zero-copy from /var/lib/containers/storage, and
  `cfs mount` (verity=require: overlayfs checks every object's digest against the image) shows the
  same files as `podman image mount`.
"""

from __future__ import annotations

import json

import pytest

from harness.pytest_vm import GuestImages
from harness.registry import Registry
from harness.vm import Machine

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.fs("ext4", "btrfs")]

EXPECTED_METHOD = {"ext4": "hardlinked", "btrfs": "reflinked"}
# Type, mode, owner, path and symlink target of every entry (directory sizes are the filesystem's
# own business), then the content of every file.
LISTING = (
    "cd {root} && find . -mindepth 1 -printf '%y %m %U:%G %p -> %l\\n' | sort && "
    "find . -type f -print0 | sort -z | xargs -0 -r sha256sum"
)


def test_verity_repository(fs_kind: str, vm: Machine, guest_image: GuestImages, registry: Registry) -> None:
    repo = "/var/lib/composefs-test"
    vm.run(["bootc-unified", "internals", "cfs", "--repo", repo, "init"])
    meta = json.loads(vm.run(["cat", f"{repo}/meta.json"]).stdout)
    assert meta["features"]["insecure"] is False

    vm.run("head -c 300000 /dev/urandom > /var/tmp/blob && sync")
    digest = vm.run(["fsverity", "digest", "--hash-alg=sha512", "/var/tmp/blob"]).stdout.split()[0]
    out = json.loads(
        vm.run(
            ["bootc-unified", "internals", "cfs", "--repo", repo, "add", "--zerocopy", "/var/tmp/blob"]
        ).stdout
    )
    assert out["method"] == EXPECTED_METHOD[fs_kind]
    assert f"sha512:{out['object_id']}" == digest
    obj = f"{repo}/objects/{out['object_id'][:2]}/{out['object_id'][2:]}"
    assert vm.run(["fsverity", "measure", obj]).stdout.split()[0] == digest
    if fs_kind == "ext4":
        assert (
            vm.run(["stat", "-c", "%i %h", obj]).stdout
            == vm.run(["stat", "-c", "%i %h", "/var/tmp/blob"]).stdout
        )

    ref = guest_image.push("app", registry)
    vm.run(["podman", "pull", "--quiet", ref], timeout=vm.timeout(120))
    cfs = ["bootc-unified", "internals", "cfs", "--repo", repo]
    storage = "/var/lib/containers/storage"
    imported = json.loads(
        vm.run([*cfs, "import", "--zerocopy", "--storage", storage, ref], timeout=vm.timeout(120)).stdout
    )
    assert imported["objects"]["copied"]["objects"] == 0
    assert vm.run(["bootc-unified", "internals", "cfs", "--repo", repo, "fsck"]).ok

    vm.run("mkdir -p /mnt/ours")
    vm.run(["bootc-unified", "internals", "cfs", "--repo", repo, "mount", imported["image_id"], "/mnt/ours"])
    try:
        assert "verity=require" in vm.run("findmnt -n -o OPTIONS /mnt/ours").stdout
        ours = vm.run(LISTING.format(root="/mnt/ours")).stdout
    finally:
        vm.run("umount /mnt/ours")
    theirs_root = vm.run(["podman", "image", "mount", ref]).stdout.strip()
    try:
        theirs = vm.run(LISTING.format(root=theirs_root)).stdout
    finally:
        vm.run(["podman", "image", "unmount", ref])
    assert ours.splitlines() == theirs.splitlines()
    assert len(ours.splitlines()) > 10
