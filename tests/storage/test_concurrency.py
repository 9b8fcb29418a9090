"""Concurrency (issue 12, R4) on a loop sysroot: `internals gc` racing an import, an upgrade or
`image set-unified`, 50 rounds; and two upgrades at once.

The deployment verbs hold the sysroot lock (bootc_unified/deploy/sysrootlock.py: a GC waits for an
update that has imported but not yet staged, whose fresh ref and store image it would otherwise
remove); an import holds the repository's writer lock, a GC its exclusive lock.

Oracles after every round: the repository's fsck; the booted, staged and imported images (their
EROFS image links, refs and, through fsck, every object they name) present; every BLS entry's image,
state dir and kernel files; `status`; podman's own list of the bootc store (the booted image and the
staged one). For two upgrades: the kernel's lock table (/proc/locks) shows the second waiting for
the sysroot's lock while the first is stopped holding it.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time

import pytest

from bootc_unified.deploy.setunified import store_image_by_digest
from bootc_unified.imgstore import ImageStore
from bootc_unified.importer import image_ref_name
from bootc_unified.repository.refs import object_id_of
from harness.loopfs import LoopFs
from harness.pytest_plugin import require
from harness.registry import Registry
from harness.run import run
from harness.scratchpodman import ScratchPodman
from harness.testimages import Buildah, push
from harness.testimages import missing_prerequisites as images_missing
from testsupport import bootimages as ti
from testsupport.crashcheck import Sandbox, Tally, invariants, store_digests
from testsupport.plugin import CLI, run_cli
from testsupport.proclocks import holds_lock, wait_until_blocked

pytestmark = pytest.mark.storage

ROUNDS = 50
KINDS = ("import", "upgrade", "set-unified")


@pytest.fixture(scope="session")
def conc_images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ti.BootImage]:
    """v1, v2, v3: bootable, each with its own files (v3 another kernel)."""
    require(images_missing(), "building bootable test images")
    b = Buildah(tmp_path_factory.mktemp("concimages"))
    out = {}
    kernels = {
        "v1": ti.KERNEL_FILES,
        "v2": ti.KERNEL_FILES,
        "v3": {
            f"usr/lib/modules/{ti.KVER}/vmlinuz": ti.blob("vmlinuz-conc", 120_000),
            f"usr/lib/modules/{ti.KVER}/initramfs.img": ti.blob("initramfs-conc", 50_000),
        },
    }
    try:
        for n, (name, kernel) in enumerate(kernels.items()):
            version = f"{n + 1}.0"
            files = {**ti.base_files(version), **kernel}
            files.update({f"usr/lib/conc/f{i}": ti.blob(f"{name}-{i}", 4000 + i) for i in range(8)})
            ti.build(b, f"conc-{name}", version, files, dirs=("sysroot",))
            ref, digest = push(b, f"conc-{name}", registry.address, "gzip")
            out[name] = ti.BootImage(f"conc-{name}", ref, digest, version)
    finally:
        b.close()
    return out


def retag(src: ti.BootImage, dest: str) -> None:
    run(
        [
            *("skopeo", "copy", "--quiet", "--preserve-digests"),
            *("--src-tls-verify=false", "--dest-tls-verify=false"),
            f"docker://{src.ref}",
            f"docker://{dest}",
        ]
    )


def popen(*args: str | os.PathLike[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str], what: str) -> tuple[str, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{what}: rc {proc.returncode}: {err}"
    return out, err


def upgrade_argv(sb: Sandbox, booted: str) -> list[str]:
    return [
        "upgrade",
        *sb.system_args(booted),
        *("--etc", str(sb.root / "state/deploy" / booted / "etc")),
        *("--system-store", str(sb.base / "no-system"), "--no-systemd", "--tls-verify", "false", "--quiet"),
    ]


def installed(loopfs: LoopFs, ref: str) -> tuple[Sandbox, str]:
    sb = Sandbox(loopfs.path / "sys").create()
    ti.install(
        ti.Target(loopfs, sb.root, sb.esp),
        *("--allow-missing-verity", "--experimental-unified-storage", "--source-imgref", f"docker://{ref}"),
    )
    return sb, os.listdir(sb.root / "state/deploy")[0]


def ref_target(sb: Sandbox, top: str, name: str) -> str | None:
    return object_id_of(sb.repo / top / "refs" / image_ref_name(name), sb.repo / "objects")


@pytest.mark.fs("ext4")
def test_gc_races_import_upgrade_set_unified(
    loopfs: LoopFs, conc_images: dict[str, ti.BootImage], registry: Registry
) -> None:
    imgs = conc_images
    ref = f"{registry.address}/conc/{loopfs.kind}/os:latest"
    retag(imgs["v1"], ref)
    sb, a = installed(loopfs, ref)
    a_ref = f"localhost/bootc-{imgs['v1'].digest}"
    assert ref_target(sb, "images", a_ref) == a
    # the import's source: a store of its own on the same filesystem (zero-copy)
    src = ScratchPodman(loopfs.path / "src")
    src("pull", "--tls-verify=false", f"docker://{imgs['v2'].ref}")
    src_ref = imgs["v2"].ref
    gc = ["internals", "gc", *sb.system_args(a), "--system-store", str(sb.base / "no-system")]
    rng = random.Random("concurrency")
    tally = Tally(loopfs.kind)
    imported_id: str | None = None
    staged_ids: dict[str, str] = {}
    waited = 0
    start = time.monotonic()
    try:
        for n in range(ROUNDS):
            kind = KINDS[n % len(KINDS)]
            label = f"round {n} ({kind} and gc)"
            if kind == "import":
                for top in ("streams", "images"):  # the last import's objects are garbage now
                    (sb.repo / top / "refs" / image_ref_name(src_ref)).unlink(missing_ok=True)
                argv = ["internals", "cfs", "--repo", str(sb.repo), "import", "--zerocopy"]
                argv += ["--storage", str(src.root), src_ref]
            elif kind == "upgrade":
                target = "v2" if (n // len(KINDS)) % 2 == 0 else "v3"
                retag(imgs[target], ref)
                argv = upgrade_argv(sb, a)
            else:
                booted_image = store_image_by_digest(sb.store, imgs["v1"].digest)
                assert booted_image is not None, f"{label}: the booted image left the store"
                ImageStore(sb.store).podman(["rmi", "--force", booted_image])
                assert imgs["v1"].digest not in store_digests(sb)
                argv = ["image", "set-unified", "--sysroot", str(sb.root), "--tls-verify", "false"]
                argv += ["--mountinfo", str(sb.mountinfo(a)), "--format", "json"]
            gc_first = rng.random() < 0.5
            delay = rng.uniform(0, 0.8)
            first = popen(*(gc if gc_first else argv))
            time.sleep(delay)
            second = popen(*(argv if gc_first else gc))
            gc_proc, verb_proc = (first, second) if gc_first else (second, first)
            out, _err = finish(verb_proc, f"{label}: {kind}")
            _gout, gerr = finish(gc_proc, f"{label}: gc")
            waited += "Waiting for sysroot lock" in gerr + _err
            tally.add("gc", f"{kind}, gc {'first' if gc_first else 'second'}", "both completed")

            # nothing live lost
            assert ref_target(sb, "images", a_ref) == a, f"{label}: the booted image's ref"
            assert ref_target(sb, "streams", a_ref) is not None, f"{label}: the booted image's streams"
            if kind == "import":
                image_id = json.loads(out)["image_id"]
                assert imported_id in (None, image_id)
                imported_id = image_id
            if imported_id is not None and kind == "import":
                assert ref_target(sb, "images", src_ref) == imported_id, f"{label}: the imported image"
            if kind == "upgrade":
                m = re.search(r"^  Deployment: ([0-9a-f]+)$", out, re.M)
                staged = m.group(1) if m else staged_ids[target]
                assert staged_ids.setdefault(target, staged) == staged
                assert json.loads(sb.marker.read_text())["depl_id"] == staged, label
            if kind == "set-unified":
                assert json.loads(out)["source"] == "registry", out
            kept = {imgs["v1"].digest}
            if sb.marker.exists():
                staged_now = json.loads(sb.marker.read_text())["depl_id"]
                kept.add(imgs["v2" if staged_now == staged_ids.get("v2") else "v3"].digest)
                assert object_id_of(sb.repo / "images" / staged_now, sb.repo / "objects") == staged_now
            invariants(sb, a, kept, label)  # fsck, entries, marker, status, podman lists `kept`
    finally:
        src.close()
    seconds = time.monotonic() - start
    print(f"\n{ROUNDS} rounds in {seconds:.0f} s; a verb waited for the sysroot lock in {waited}")
    tally.save(f"concurrency-{loopfs.kind}", kind="rounds")


@pytest.mark.fs("xfs")
def test_two_upgrades_at_once_one_waits(
    loopfs: LoopFs, conc_images: dict[str, ti.BootImage], registry: Registry
) -> None:
    imgs = conc_images
    ref = f"{registry.address}/conc2/{loopfs.kind}/os:latest"
    retag(imgs["v1"], ref)
    sb, a = installed(loopfs, ref)
    retag(imgs["v2"], ref)
    one = popen(*upgrade_argv(sb, a))
    deadline = time.monotonic() + 60
    while holds_lock(one.pid, [sb.root]) is None:  # the kernel's lock table: it holds the sysroot
        assert one.poll() is None and time.monotonic() < deadline, "the first upgrade never took the lock"
        time.sleep(0.005)
    os.kill(one.pid, signal.SIGSTOP)
    try:
        two = popen(*upgrade_argv(sb, a))
        waiting = wait_until_blocked(two, [sb.root], timeout=60)  # type: ignore[arg-type]
        assert (waiting.kind, waiting.mode) == ("FLOCK", "WRITE"), waiting
        assert two.poll() is None
    finally:
        os.kill(one.pid, signal.SIGCONT)
    out1, err1 = finish(one, "first upgrade")
    out2, err2 = finish(two, "second upgrade")
    assert err1 == "" and err2 == "bootc-unified: Waiting for sysroot lock...\n", (err1, err2)
    staged = json.loads(sb.marker.read_text())["depl_id"]
    assert f"  Deployment: {staged}\n" in out1
    assert out2 == f"Pull path: unified\nNo changes in {ref}\n", out2
    assert sorted(os.listdir(sb.root / "state/deploy")) == sorted([a, staged])
    invariants(sb, a, {imgs["v1"].digest, imgs["v2"].digest}, "two upgrades")
    run_cli("internals", "cfs", "--repo", sb.repo, "fsck")
    sb.quiesce()
