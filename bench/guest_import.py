#!/usr/bin/env python3
"""Benchmark: the import in a guest whose kernel does the fs-verity hashing (issue 13), vs its floor.

In an installed guest (the cached unified install of v1, ext4 `-O verity` or btrfs, the trixie
kernel), on the physical root: the guest image is pulled twice with the guest's podman, into two
scratch stores, then, caches dropped before each and timed in the same run:
  - the floor, on store A: `cp -al` (ext4) / `cp -a --reflink=always` (btrfs) of the layers' diff/
    trees, then fs-verity enabled on every file (the FS_IOC_ENABLE_VERITY ioctl in one process,
    as `fsverity enable` does per file, without a process per file); and, reported apart, sha256
    of every file's bytes (the DiffID check reads each byte once; bench/import_image.py counts it);
  - ours, on store B: `internals cfs init` (a verity repository, sha512) and `internals cfs import
    --zerocopy` (layer streams, objects with fs-verity enabled by the kernel, the EROFS image);
and the ratio. TCG makes every number slow; the ratio is what counts.

Usage: bench/guest_import.py [--fs ext4,btrfs] [--keep-vm-on-failure]
It runs itself under pytest, for the harness's VM fixtures (the guest image, the installed disk
cache, the registry); it asserts nothing about time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from harness import installed
from harness.pytest_vm import GuestImages, InstalledDiskFactory, VmFactory
from harness.registry import Registry

BENCH = "/sysroot/bench"
GUEST = r"""
import hashlib, json, os, subprocess, sys, time
from pathlib import Path
from bootc_unified import verity

root, image, fs = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

# the scratch stores only: the guest's own storage.conf lists the bootc store as an additional
# image store, where podman would find the image and pull nothing
conf = root / "storage.conf"
conf.write_text('[storage]\ndriver = "overlay"\n')
ENV = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf)}

def run(*argv):
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no stderr"])[-1]
        sys.exit(f"{' '.join(argv[:4])} ... exited {proc.returncode}: {last}")
    return proc.stdout

def drop():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")

def regular_files(top):
    for dirpath, _, names in os.walk(top):
        for n in names:
            p = os.path.join(dirpath, n)
            if os.path.isfile(p) and not os.path.islink(p):
                yield p

def podman(store, *argv):
    return run("podman", "--root", str(root / store), "--runroot", f"/run/bench-{store}", *argv)

for store in ("a", "b"):
    podman(store, "pull", "--quiet", image)
info = json.loads(podman("a", "image", "inspect", image))[0]["GraphDriver"]["Data"]
diffs = [info["UpperDir"], *[d for d in info.get("LowerDir", "").split(":") if d]]
files = bytes_ = 0
for d in diffs:
    for p in regular_files(d):
        files += 1
        bytes_ += os.path.getsize(p)

drop()
start = time.monotonic()
copy = ["cp", "-al"] if fs == "ext4" else ["cp", "-a", "--reflink=always"]
(root / "floor").mkdir()
for i, d in enumerate(diffs):
    run(*copy, d, str(root / "floor" / str(i)))
copied = time.monotonic() - start
for p in regular_files(root / "floor"):
    fd = os.open(p, os.O_RDONLY)
    try:
        verity.enable(fd, verity.HashAlg.SHA512)
    finally:
        os.close(fd)
floor = time.monotonic() - start
# the DiffID check's part of the floor (bench/import_image.py counts it): sha256 of every byte once
start = time.monotonic()
for p in regular_files(root / "floor"):
    with open(p, "rb") as f:
        hashlib.file_digest(f, "sha256")
sha256 = time.monotonic() - start

drop()
start = time.monotonic()
repo = str(root / "repo")
run("bootc-unified", "internals", "cfs", "--repo", repo, "init", "--hash", "sha512")
out = run("bootc-unified", "internals", "cfs", "--repo", repo, "import", "--zerocopy",
          "--storage", str(root / "b"), image)
ours = time.monotonic() - start
print(json.dumps({"layers": len(diffs), "files": files, "bytes": bytes_, "copy_seconds": copied,
                  "floor_seconds": floor, "sha256_seconds": sha256, "ours_seconds": ours,
                  "import": out.strip().splitlines()[-1]}))
"""


@pytest.mark.fs("ext4", "btrfs")  # the guest kernel's fs-verity filesystems
def test_guest_import(
    fs_kind: str,
    installed_disk_factory: InstalledDiskFactory,
    vm_factory: VmFactory,
    guest_image: GuestImages,
    registry: Registry,
) -> None:
    vm = vm_factory(installed_disk_factory("v1", fs_kind, True))
    installed.map_test_registry(vm, registry.address)
    guest_image.push("v1", registry, installed.REFERENCES["v1"])
    vm.run(f"mount -o remount,rw /sysroot && rm -rf {BENCH} && mkdir -p {BENCH}")
    script = "/var/tmp/guest_import_bench.py"
    vm.run(f"cat > {script} <<'EOF'\n{GUEST}\nEOF")
    out = vm.run(
        ["python3", script, BENCH, installed.variant_ref("v1"), fs_kind], timeout=vm.timeout(3600)
    ).stdout
    got = json.loads(out.strip().splitlines()[-1])
    ours, floor, sha256 = got["ours_seconds"], got["floor_seconds"], got["sha256_seconds"]
    print(
        f"\n{fs_kind} (guest, TCG): {got['layers']} layers, {got['files']} files, "
        f"{got['bytes'] / 2**20:.0f} MiB: floor {floor:.1f} s "
        f"(copy {got['copy_seconds']:.1f} s + fs-verity enable), ours {ours:.1f} s -> {ours / floor:.2f}x; "
        f"with the DiffID's sha256 of every byte ({sha256:.1f} s) in the floor: "
        f"{ours / (floor + sha256):.2f}x"
        f"\n  {got['import']}"
    )
    vm.run(f"rm -rf {BENCH}", timeout=vm.timeout(600))
    vm.poweroff()


def main() -> int:
    args = sys.argv[1:]
    if not any(a == "--fs" or a.startswith("--fs=") for a in args):
        args += ["--fs", "ext4,btrfs"]
    return pytest.main([str(Path(__file__).resolve()), "-s", "-q", "-p", "no:cacheprovider", *args])


if __name__ == "__main__":
    sys.exit(main())
