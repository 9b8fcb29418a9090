"""`image set-unified` on a system installed without the bootc store, on loop btrfs/XFS/ext4.

A two-layer bootable image (~26 MiB of file data: large random files, a hardlink group, two files of
equal content but different modes, a setuid file, a file with a user xattr, a whiteout, busybox) is
installed WITHOUT --experimental-unified-storage, then set-unified runs as if booted from it.

Oracles: podman's own view of the bootc store (`images`, `inspect`, `image mount`, `save`, `run`),
the registry's manifest digest, sha256 of podman's layer export against the DiffIDs, statvfs of the
filesystem (after sync) before and after, FIEMAP / inode identity between store files and objects
(harness/zerocopy_audit.py, harness/checks.py), the kernel mounting the deployment's EROFS image
compared with podman's mount of the store's image (every mode, owner, mtime, xattr, hardlink group),
and the repository's fsck.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from bootc_unified.cstorage import Store
from bootc_unified.imgstore import ImageStore
from harness.checks import all_extents_shared, fiemap
from harness.pytest_plugin import require
from harness.registry import Registry, free_port
from harness.run import run
from harness.scratchpodman import ScratchPodman
from harness.testimages import Buildah, push
from harness.testimages import missing_prerequisites as images_missing
from harness.treecompare import differences
from harness.zerocopy_audit import audit
from testsupport import bootimages as ti
from testsupport.plugin import run_cli

pytestmark = pytest.mark.storage
target = ti.target  # the fixture: a loop filesystem with root/ and esp/ directories
Target = ti.Target

MiB = 1 << 20
GROWTH_LIMIT = 0.10  # of the image's file bytes (the justification is in test_set_unified)
BUSYBOX = Path("/bin/busybox")
# podman run on this host (cgroup v1, runc): rlimits above what runc may set are refused.
RUN_LIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")


def rnd(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _base_layer(root: Path) -> None:
    files = {**ti.base_files("1.0"), **ti.KERNEL_FILES}
    files.update({f"usr/lib/big/blob{i}": rnd(f"blob{i}", 3 * MiB) for i in range(6)})
    files.update({f"usr/share/small/s{i}": f"small {i}\n".encode() for i in range(8)})
    files["usr/lib/dup-a"] = rnd("dup", 100_000)
    files["usr/lib/dup-b"] = rnd("dup", 100_000)  # same content, another mode: one object
    files["usr/lib/xattr-file"] = rnd("xattr", 80_000)
    files["usr/bin/suid"] = rnd("suid", 120_000)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.chmod(root / "usr/lib/dup-b", 0o755)
    os.chmod(root / "usr/bin/suid", 0o4755)
    os.setxattr(root / "usr/lib/xattr-file", "user.bootc-test", b"kept")
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-hardlink")
    shutil.copyfile(BUSYBOX, root / "usr/bin/busybox")
    os.chmod(root / "usr/bin/busybox", 0o755)


def _top_layer(root: Path) -> None:
    (root / "usr/lib/big/blob0").write_bytes(rnd("blob0-v2", 3 * MiB))
    (root / "usr/share/layer2").write_bytes(rnd("layer2", 2 * MiB))
    (root / "usr/lib/big/blob5").unlink()


def _commit(b: Buildah, base: str, change: object, name: str) -> None:
    container = b("from", "--pull-never", base)
    root = Path(b("mount", container))
    assert callable(change)
    change(root)
    b("config", "--annotation", f"{ti.VERSION_ANNOTATION}=1.0", "--arch", "amd64", "--os", "linux", container)
    b("commit", "--quiet", "--rm", "--timestamp", "1700000000", container, f"localhost/{name}:latest")


@pytest.fixture(scope="session")
def su_image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> ti.BootImage:
    require(images_missing() + ([] if BUSYBOX.is_file() else [f"{BUSYBOX} (busybox-static)"]), "test images")
    b = Buildah(tmp_path_factory.mktemp("setunified"))
    try:
        _commit(b, "scratch", _base_layer, "su-base")
        _commit(b, "localhost/su-base:latest", _top_layer, "su-os")
        ref, digest = push(b, "su-os", registry.address, "gzip")
    finally:
        b.close()
    return ti.BootImage("su-os", ref, digest, "1.0")


# --- helpers -------------------------------------------------------------------------------------------


def used_bytes(path: Path) -> int:
    run(["sync", "-f", str(path)])
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def set_unified(t: Target, depl_id: str, tmp: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cli(
        *("image", "set-unified", "--sysroot", t.root, "--tls-verify", "false", "--format", "json"),
        *("--mountinfo", ti.booted_mountinfo(depl_id, tmp)),
        check=check,
    )


def file_bytes(store: Path, image_id: str) -> int:
    """Bytes of regular-file data the image's layers hold in the store (what a copy would cost)."""
    total = 0
    for layer in Store.open(store).image(image_id).layers:
        seen = set()
        for p in layer.diff_path.rglob("*"):
            st = p.lstat()
            if p.is_file() and not p.is_symlink() and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def unshared_store_files(t: Target, image_id: str) -> list[str]:
    """Store files over 64 bytes that share nothing with an object (by the kernel's account)."""
    objects = {(st.st_dev, st.st_ino) for p in (t.root / "composefs/objects").rglob("*") if (st := p.lstat())}
    out = []
    for layer in Store.open(t.store).image(image_id).layers:
        for p in sorted(layer.diff_path.rglob("*")):
            st = p.lstat()
            if not p.is_file() or p.is_symlink() or st.st_size <= 64:
                continue
            if t.fs.kind == "ext4":
                shared = (st.st_dev, st.st_ino) in objects
            else:
                extents = fiemap(p)
                shared = all(e.inline for e in extents) or all_extents_shared(p)
            if not shared:
                out.append(str(p.relative_to(layer.diff_path)))
    return out


def podman_checks(t: Target, image: ti.BootImage, name: str, depl_id: str, tmp: Path) -> dict[str, object]:
    """podman's own view: one image, the registry's digest, `name` on it, runnable, its tree equal to
    the deployment's EROFS image; returns `podman image inspect`."""
    pm = ti.podman_on(t.store, tmp / "podman")
    try:
        listed = pm.images()
        assert len(listed) == 1 and listed[0]["Digest"] == image.digest, listed
        inspect: dict[str, object] = json.loads(pm("image", "inspect", name))[0]
        assert inspect["Digest"] == image.digest
        out = pm("run", "--rm", "--network=none", *RUN_LIMITS, name, "busybox", "cat", "/usr/lib/os-release")
        assert out.encode() + b"\n" == ti.os_release("1.0")
        theirs = ti.podman_tree(pm, name)
    finally:
        pm.close()
    ours = ti.mounted_image(t, depl_id, tmp / "mnt")
    ours.records[b"/"] = theirs.records[b"/"]
    assert differences(theirs, ours) == []
    return inspect


def fsck(t: Target) -> None:
    proc = run_cli("internals", "cfs", "--repo", t.root / "composefs", "fsck", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the tests -----------------------------------------------------------------------------------------


def test_set_unified(target: Target, su_image: ti.BootImage, tmp_path: Path) -> None:
    t, image = target, su_image
    ti.install(t, "--allow-missing-verity", "--source-imgref", image.docker)
    depl_id = ti.deployment_id(t)
    # podman's view with the bootc store's runroot: a libpod database written with another one would
    # make every later command of the store's own (explicit --runroot) refuse to run.
    pm = ScratchPodman(tmp_path / "before", graphroot=t.store, runroot=ImageStore(t.store).runroot)
    try:
        assert pm.images() == []  # the store lacks the image
    finally:
        pm.close()
    # An object's metadata means nothing to composefs; ext4 must give it the file's before linking.
    some = next(p for p in sorted((t.root / "composefs/objects").rglob("*")) if p.stat().st_size == 2 * MiB)
    os.chmod(some, 0o600)
    os.utime(some, ns=(0, 0))

    before = used_bytes(t.fs.path)
    proc = set_unified(t, depl_id, tmp_path)
    after = used_bytes(t.fs.path)
    result = json.loads(proc.stdout)
    assert result["source"] == "registry" and result["manifest_digest"] == image.digest, result["why_rebuilt"]
    assert result["tagged"] == image.ref

    inspect = podman_checks(t, image, image.ref, depl_id, tmp_path)
    image_id = str(inspect["Id"])
    data = file_bytes(t.store, image_id)
    growth = after - before
    stats = result["dedupe"]
    print(
        f"\nset-unified on {t.fs.kind}: image file bytes {data}, disk used before {before}, after {after}, "
        f"growth {growth} B = {100 * growth / data:.2f}% of the image; dedupe {json.dumps(stats)}"
    )
    # Without sharing, the store's copy costs `data` bytes. With it, what remains is the store's own
    # metadata (layers.json, tar-split, overlay links, directories: a few hundred KiB) plus files the
    # kernel or the metadata rule keeps apart (dup-b on ext4: 100 kB): far below 10% of 26 MiB.
    assert data > 20 * MiB
    assert growth < GROWTH_LIMIT * data, (growth, data)

    expected_dup = ["usr/lib/dup-b"] if t.fs.kind == "ext4" else []
    assert unshared_store_files(t, image_id) == expected_dup
    assert stats["method"] == ("hardlink" if t.fs.kind == "ext4" else "dedupe")
    duplicated = {reason: (d["files"], d["bytes"]) for reason, d in stats["duplicated"].items()}
    if t.fs.kind == "ext4":  # dup-b: its object has dup-a's mode, and dup-a links to it
        assert duplicated == {"metadata differs from its object's, which other files share": (1, 100_000)}
    elif t.fs.kind == "btrfs":  # files up to max_inline (2 KiB) live in btrfs metadata, unshareable
        (files, size) = duplicated.pop("data inline in filesystem metadata (cannot be shared)", (0, 0))
        assert duplicated == {} and size <= files * 2048
    else:
        assert duplicated == {}
    assert (
        stats["shared"]["files"]
        + stats["already_shared"]["files"]
        + sum(d["files"] for d in stats["duplicated"].values())
        == stats["files"]["files"]
    )
    found = audit(t.root / "composefs", t.store)
    assert found.unaccounted == {}, found.unaccounted
    assert found.hardlinked if t.fs.kind == "ext4" else found.reflinked, found
    fsck(t)
    assert not (t.root / "ostree/bootc/.set-unified").exists()
    assert sorted(os.listdir(t.root / "ostree/bootc")) == ["storage"]
    status = json.loads(ti.status(t, depl_id, tmp_path, "--format", "json").stdout)
    assert status["status"]["booted"]["unified"] is True

    # A second run is a no-op: nothing fetched, nothing newly shared, nothing more on disk.
    again = json.loads(set_unified(t, depl_id, tmp_path).stdout)
    assert again["source"] == "already-present" and again["store_image_id"] == image_id
    assert again["dedupe"]["shared"]["files"] == 0
    assert again["dedupe"]["already_shared"] == stats["shared"]
    assert again["dedupe"]["duplicated_bytes"] == stats["duplicated_bytes"]
    assert used_bytes(t.fs.path) - after < MiB
    podman_checks(t, image, image.ref, depl_id, tmp_path)
    fsck(t)


@pytest.mark.parametrize("how", ["unreachable", "gone"])
def test_set_unified_rebuilds_from_the_repository(
    target: Target, su_image: ti.BootImage, registry: Registry, how: str, tmp_path: Path
) -> None:
    t, image = target, su_image
    if how == "gone" and t.fs.kind != "xfs":
        pytest.skip("an image the registry no longer has: once, on XFS")
    name = f"127.0.0.1:{free_port()}/gone/os:1" if how == "unreachable" else f"{registry.address}/gone/os:1"
    ti.install(t, "--allow-missing-verity", "--source-imgref", image.docker, "--target-imgref", name)
    depl_id = ti.deployment_id(t)
    before = used_bytes(t.fs.path)
    result = json.loads(set_unified(t, depl_id, tmp_path).stdout)
    after = used_bytes(t.fs.path)
    assert result["source"] == "repository", result
    assert result["why_rebuilt"].startswith("registry: ") and result["tagged"] == name
    inspect = podman_checks(t, image, name, depl_id, tmp_path)
    data = file_bytes(t.store, str(inspect["Id"]))
    print(
        f"\nrebuilt on {t.fs.kind} ({how}): growth {after - before} B = {100 * (after - before) / data:.2f}%"
    )
    assert after - before < GROWTH_LIMIT * data

    # The DiffIDs the registry's config names, and podman's own export of each layer hashes to them.
    config = json.loads(run(["skopeo", "inspect", "--config", "--tls-verify=false", image.docker]).stdout)
    diff_ids = config["rootfs"]["diff_ids"]
    assert inspect["RootFS"] == {"Type": "layers", "Layers": diff_ids}
    exported = podman_layer_digests(t, name, tmp_path)
    assert exported == diff_ids
    assert unshared_store_files(t, str(inspect["Id"])) == (["usr/lib/dup-b"] if t.fs.kind == "ext4" else [])
    fsck(t)
    assert sorted(os.listdir(t.root / "ostree/bootc")) == ["storage"]
    again = json.loads(set_unified(t, depl_id, tmp_path).stdout)
    assert again["source"] == "already-present" and again["dedupe"]["shared"]["files"] == 0


@pytest.mark.fs("ext4")
def test_bad_input_one_line(target: Target, su_image: ti.BootImage, tmp_path: Path) -> None:
    t = target
    plain = tmp_path / "mountinfo-plain"
    plain.write_text("36 1 0:40 / / rw,relatime shared:1 - ext4 /dev/vda2 rw\n")
    cases = [
        (plain, "not booted from a composefs deployment"),
        (ti.booted_mountinfo("ab" * 64, tmp_path), "origin file is missing"),
    ]
    for mountinfo, needle in cases:
        proc = run_cli("image", "set-unified", "--sysroot", t.root, "--mountinfo", mountinfo, check=False)
        err = proc.stderr.strip()
        assert proc.returncode == 1 and "\n" not in err and needle in err, err
    assert ti.listing(t.root) == []


def podman_layer_digests(t: Target, name: str, tmp: Path) -> list[str]:
    """sha256 of each layer tar podman itself exports from the store (`podman save`, docker-dir)."""
    pm = ti.podman_on(t.store, tmp / "save")
    out = tmp / "saved"
    try:
        pm("save", "--format", "docker-dir", "-o", str(out), name)
        saved = json.loads((out / "manifest.json").read_text())
        return [
            "sha256:" + hashlib.sha256((out / x["digest"].removeprefix("sha256:")).read_bytes()).hexdigest()
            for x in saved["layers"]
        ]
    finally:
        pm.close()
        shutil.rmtree(out, ignore_errors=True)


CRASH_POINTS = {  # point -> the filesystem where that code runs
    "dedupe-before-rename:3": "ext4",  # a link made in the staging directory, not yet renamed
    "dedupe-after-rename:5": "ext4",  # some files linked, directory times not yet put back
    "rebuild-after-push": "xfs",  # the rebuilt image in the store, the work directory still there
}


@pytest.mark.fs("ext4", "xfs")
@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
def test_killed_and_run_again(target: Target, su_image: ti.BootImage, point: str, tmp_path: Path) -> None:
    t, image = target, su_image
    if CRASH_POINTS[point] != t.fs.kind:
        pytest.skip(f"{point} is reached on {CRASH_POINTS[point]}")
    rebuild = point.startswith("rebuild")
    name = f"127.0.0.1:{free_port()}/gone/os:1" if rebuild else image.ref
    ti.install(t, "--allow-missing-verity", "--source-imgref", image.docker, "--target-imgref", name)
    depl_id = ti.deployment_id(t)
    before = used_bytes(t.fs.path)
    mountinfo = ti.booted_mountinfo(depl_id, tmp_path)
    argv = ["image", "set-unified", "--sysroot", t.root, "--tls-verify", "false", "--mountinfo", mountinfo]
    killed = run_cli(*argv, check=False, env={"BOOTC_UNIFIED_CRASH_AT": point})
    assert killed.returncode == -9, killed.stderr
    left = sorted(os.listdir(t.root / "ostree/bootc"))
    if rebuild:
        assert len(left) == 2 and left[0].startswith(".set-unified-rebuild-") and left[1] == "storage", left
    else:
        assert left == [".set-unified", "storage"], left
        assert (t.root / "ostree/bootc/.set-unified/dirtimes.json").is_file()
    # Killed at any point, the store's image is whole: podman exports every layer bit-exactly.
    diff_ids = json.loads(run(["skopeo", "inspect", "--config", "--tls-verify=false", image.docker]).stdout)
    pm = ti.podman_on(t.store, tmp_path / "crashed")
    try:
        [listed] = pm.images()  # (a rebuilt image gets its name after the push)
    finally:
        pm.close()
    assert listed["Digest"] == image.digest
    assert podman_layer_digests(t, str(listed["Id"]), tmp_path) == diff_ids["rootfs"]["diff_ids"]

    result = json.loads(set_unified(t, depl_id, tmp_path).stdout)
    assert result["source"] == "already-present"
    assert sorted(os.listdir(t.root / "ostree/bootc")) == ["storage"]
    inspect = podman_checks(t, image, name, depl_id, tmp_path)  # directory times put back, too
    assert unshared_store_files(t, str(inspect["Id"])) == (["usr/lib/dup-b"] if t.fs.kind == "ext4" else [])
    fsck(t)
    data = file_bytes(t.store, str(inspect["Id"]))
    assert used_bytes(t.fs.path) - before < GROWTH_LIMIT * data
