"""zstd:chunked partial pulls through the bootc store, in the trixie guest (podman 5.4,
containers-storage 1.57, skopeo 1.18) on its btrfs, XFS and ext4 root. The host's side (Debian 12's
podman 4.3, whose partial layers cannot be imported) is tests/storage/test_zstd_chunked.py.

The update is harness.chunked's v1 -> v2 (one layer rebuilt with a few files changed and added),
pushed gzip by the host; the guest's skopeo converts it to zstd:chunked in the registry. Then two
bootc stores in the guest pull v1 and v2 with `bootc-unified image pull`: one zstd:chunked, one
gzip. Checked, each against an oracle that is not the product's own code:
- the guest's zstd:chunked has a tar-split in the blob (the manifest's
  `io.github.containers.zstd-chunked.tarsplit-position` annotation, read by the host);
- the store's own storage.conf enables partial pulls (podman >= 5.3);
- bytes the registry sent for v1 -> v2 (its access log): zstd:chunked about the new files' contents
  in range reads, gzip the whole layer; the ratio is printed;
- the partially pulled layer's record (layers.json): `toc-digest`, a `diff-digest` equal to the
  DiffID podman's own `image inspect` reports, and a tar-split file; podman's view of it (`podman
  image mount`) is the whole-pulled gzip image's, except directory mtimes: a partial pull leaves
  directories with the time of the pull (measured; the tar says otherwise, and a whole pull keeps it);
- `cfs import --zerocopy` of v1 and v2 from the partial store copies nothing: harness.zerocopy_audit
  (in the guest) finds every object hardlinked to a diff/ file (ext4) or sharing all its extents
  with one (btrfs, XFS), one per distinct file content; the EROFS image IDs equal those of the gzip
  store's import into another repository (byte-identical repository content from both pulls), and
  the mounted image shows the whole-pulled image's tree (harness.treewalk records, compared).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path

import pytest

from harness import chunked
from harness.guestmodules import run_module, ship
from harness.pytest_plugin import require
from harness.pytest_vm import DiskFactory, VmFactory, guest_reference
from harness.registry import Registry
from harness.registry import missing_prerequisites as registry_missing
from harness.testimages import fetch_manifest
from harness.testimages import missing_prerequisites as images_missing
from harness.treecompare import Snapshot, differences
from harness.treewalk import from_json
from harness.vm import Machine

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.sample("btrfs")]

ZC = chunked.ZSTD_CHUNKED
SHARED = {"ext4": "hardlinked", "btrfs": "reflinked", "xfs": "reflinked"}
TARSPLIT_ANNOTATION = "io.github.containers.zstd-chunked.tarsplit-position"
PARTIAL_OVERHEAD = 64 << 10  # TOC + tar-split frames + config; measured ~10 KiB
SYSROOTS = {ZC: "/var/tmp/zc-chunked", "gzip": "/var/tmp/zc-gzip"}
REPOS = {ZC: "/var/lib/zc-repo-chunked", "gzip": "/var/lib/zc-repo-gzip"}


def store_of(compression: str) -> str:
    return f"{SYSROOTS[compression]}/ostree/bootc/storage"


def store_conf(compression: str) -> str:
    """Shell: the storage.conf the product wrote for this store (it names the store's graphroot)."""
    return f"$(grep -l 'graphroot = \"{store_of(compression)}\"' /run/bootc-unified/*/storage.conf)"


def podman(compression: str) -> str:
    """The guest's podman on one of the bootc stores, for podman's own view: with the runroot the
    store's storage.conf names (libpod's database refuses any other once the store was used)."""
    runroot = f"$(sed -n 's/^runroot = \"\\(.*\\)\"$/\\1/p' {store_conf(compression)})"
    opts = "--storage-driver overlay --storage-opt overlay.skip_mount_home=true"
    return f"podman --root {store_of(compression)} --runroot {runroot} {opts}"


def guest_ref(registry: Registry, name: str, compression: str) -> str:
    return guest_reference(f"{registry.address}/{chunked.repository(compression)}:{chunked.tag(name)}")


def snapshot(vm: Machine, root: str) -> Snapshot:
    return from_json(run_module(vm, "treewalk", root))


def podman_view(vm: Machine, compression: str, ref: str) -> Snapshot:
    root = vm.run(f"{podman(compression)} image mount {shlex.quote(ref)}").stdout.strip()
    try:
        return snapshot(vm, root)
    finally:
        vm.run(f"{podman(compression)} image unmount {shlex.quote(ref)}")


def with_dir_mtimes_of(snap: Snapshot, reference: Snapshot) -> Snapshot:
    """`snap` with each directory's mtime taken from `reference` (the one known divergence)."""
    records = {
        path: replace(rec, mtime=ref.mtime, mtime_nsec=ref.mtime_nsec)
        if rec.kind == "dir" and (ref := reference.records.get(path)) is not None
        else rec
        for path, rec in snap.records.items()
    }
    return Snapshot(records, snap.hardlinks)


def test_zstd_chunked_partial_pull_and_import(
    fs_kind: str, tmp_path: Path, vm_factory: VmFactory, disk_factory: DiskFactory
) -> None:
    require(registry_missing() + images_missing(), "the zstd:chunked update")
    with Registry.start(tmp_path / "registry", access_log=True) as registry:
        updates = chunked.build_and_push(registry.address, tmp_path / "updates", ("gzip",))
        vm = vm_factory(disk_factory("v1", fs_kind))
        ship(vm)

        # (a) the guest's skopeo writes zstd:chunked with a tar-split in the blob.
        for name in ("upd-v1", "upd-v2"):
            source, dest = guest_ref(registry, name, "gzip"), guest_ref(registry, name, ZC)
            copy = ["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false"]
            copy += ["--dest-compress-format", ZC, f"docker://{source}", f"docker://{dest}"]
            vm.run(copy, timeout=vm.timeout(120))
            layers = fetch_manifest(registry.address, chunked.repository(ZC), chunked.tag(name))["layers"]
            assert isinstance(layers, list) and len(layers) == 1, layers
            assert TARSPLIT_ANNOTATION in layers[0].get("annotations", {}), layers

        # (b) pulls through the bootc stores, measured by the registry's access log.
        fetched: dict[tuple[str, str], chunked.Fetched] = {}
        for compression, sysroot in SYSROOTS.items():
            vm.run(["mkdir", "-p", sysroot])
            for name in ("upd-v1", "upd-v2"):
                offset = registry.log_offset()
                ref = guest_ref(registry, name, compression)
                vm.run(
                    ["bootc-unified", "image", "pull", "--sysroot", sysroot, "--tls-verify", "false", ref],
                    timeout=vm.timeout(300),
                )
                fetched[(name, compression)] = chunked.fetched(registry, offset)
        conf = vm.run(f"cat {store_conf(ZC)}").stdout
        assert 'enable_partial_images = "true"' in conf, conf
        partial, whole = fetched[("upd-v2", ZC)], fetched[("upd-v2", "gzip")]
        gzip_layer = updates.layer_sizes[("upd-v2", "gzip")]
        ratio = whole.blob_bytes / partial.blob_bytes
        every = {f"{name} {compression}": f.to_json() for (name, compression), f in fetched.items()}
        print(
            f"{fs_kind}: v1 -> v2 fetched: gzip {whole.blob_bytes} bytes, zstd:chunked {partial.blob_bytes} "
            f"bytes ({partial.range_requests} range reads); ratio {ratio:.1f}x; new content "
            f"{chunked.new_content_bytes()} bytes; all: {json.dumps(every)}"
        )
        assert whole.blob_bytes >= gzip_layer
        assert partial.range_requests >= 1
        assert (
            chunked.new_content_bytes()
            <= partial.blob_bytes
            <= chunked.new_content_bytes() + PARTIAL_OVERHEAD
        )
        assert ratio > 10

    # (c) what the store keeps for the partially pulled layer.
    v2 = guest_ref(registry, "upd-v2", ZC)
    [diff_id] = json.loads(vm.run(f"{podman(ZC)} image inspect {v2}").stdout)[0]["RootFS"]["Layers"]
    records = json.loads(vm.run(["cat", f"{store_of(ZC)}/overlay-layers/layers.json"]).stdout)
    [record] = [r for r in records if r.get("diff-digest") == diff_id]
    print(f"{fs_kind}: partial layer record {json.dumps(record)}")
    assert record.get("toc-digest", "").startswith("sha256:")
    assert vm.run(["test", "-s", f"{store_of(ZC)}/overlay-layers/{record['id']}.tar-split.gz"]).ok
    whole_view = podman_view(vm, "gzip", guest_ref(registry, "upd-v2", "gzip"))
    partial_view = podman_view(vm, ZC, v2)
    assert len(whole_view.records) > chunked.FILES
    assert differences(whole_view, with_dir_mtimes_of(partial_view, whole_view)) == []
    changed = len(differences(whole_view, partial_view, limit=1000))
    print(f"{fs_kind}: directories whose mtime the partial pull did not keep: {changed}")

    # (d) zero-copy, bit-exact import from the partial store; the same repository content as gzip's.
    image_ids: dict[tuple[str, str], str] = {}
    insecure = ["--insecure"] if fs_kind == "xfs" else []  # the guest's XFS has no fs-verity
    for compression, repo in REPOS.items():
        vm.run(["bootc-unified", "internals", "cfs", "--repo", repo, "init", *insecure])
        for name in ("upd-v1", "upd-v2"):
            ref = guest_ref(registry, name, compression)
            cfs_import = ["bootc-unified", "internals", "cfs", "--repo", repo, "import", "--zerocopy"]
            out = vm.run(
                [*cfs_import, "--storage", store_of(compression), ref], timeout=vm.timeout(300)
            ).stdout
            result = json.loads(out)
            assert result["objects"]["copied"]["objects"] == 0, result
            image_ids[(name, compression)] = result["image_id"]
    for name in ("upd-v1", "upd-v2"):
        assert image_ids[(name, ZC)] == image_ids[(name, "gzip")], name

    audit = json.loads(run_module(vm, "zerocopy_audit", REPOS[ZC], store_of(ZC)))
    counts = {k: len(v) for k, v in audit.items()}
    print(f"{fs_kind}: zero-copy audit of the partial store's import {counts}")
    assert audit["unaccounted"] == {}
    assert len(audit[SHARED[fs_kind]]) == chunked.FILES + chunked.CHANGED + chunked.ADDED, counts

    vm.run("mkdir -p /mnt/zc")
    image_v2 = image_ids[("upd-v2", ZC)]
    vm.run(["bootc-unified", "internals", "cfs", "--repo", REPOS[ZC], "mount", image_v2, "/mnt/zc"])
    try:
        ours = snapshot(vm, "/mnt/zc")
    finally:
        vm.run("umount /mnt/zc")
    ours.records[b"/"] = whole_view.records[b"/"]  # the root's metadata is podman's own choice
    assert differences(whole_view, ours) == []
