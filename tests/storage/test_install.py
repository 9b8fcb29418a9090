"""`install to-filesystem` onto loop btrfs/XFS/ext4, `status` on the result, `install to-disk` refusals.

Bootable test images are built here with buildah (helpers in harness/bootimages.py: a kernel +
initramfs as small files under /usr/lib/modules/<kver>/, os-release, kargs.d, /etc and /var
content) and pushed to the local registry. Oracles: the bytes we generated (kernel, initramfs,
their sha256), the registry's manifest digest (skopeo), podman's own view and `podman inspect` of
the stores, blkid, FIEMAP and inode identity, the kernel mounting our EROFS image.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from bootc_unified.importer import image_ref_name
from harness.loopfs import LoopFs
from harness.pytest_plugin import require
from harness.registry import Registry
from harness.run import run
from harness.scratchpodman import ScratchPodman
from harness.testimages import Buildah, push
from harness.testimages import missing_prerequisites as images_missing
from harness.treecompare import differences, snapshot_dir
from testsupport import bootimages, permissions
from testsupport.bootimages import (
    BOOT_DIGEST,
    INITRAMFS,
    KERNEL,
    KERNEL_FILES,
    VERSION_ANNOTATION,
    BootImage,
    Target,
    assert_zero_copy,
    base_files,
    blob,
    build,
    deployment_id,
    fs_uuid,
    install,
    listing,
    mounted_image,
    podman_on,
    podman_tree,
    status,
    sub_snapshot,
    the_entry,
)
from testsupport.plugin import run_cli

pytestmark = pytest.mark.storage

BOOT_IMAGES: dict[str, tuple[str, dict[str, bytes]]] = {
    "boot-a": ("1.0", {**base_files("1.0"), **KERNEL_FILES}),
    "boot-b": ("2.0", {**base_files("2.0"), **KERNEL_FILES, "usr/share/b-only": blob("b", 70_000)}),
    "boot-nokernel": ("3.0", base_files("3.0")),
    "boot-badkargs": (
        "4.0",
        {**base_files("4.0"), **KERNEL_FILES, "usr/lib/bootc/kargs.d/30-bad.toml": b"kargs = not a list\n"},
    ),
}


@pytest.fixture(scope="session")
def boot_images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, BootImage]:
    require(images_missing(), "building bootable test images")
    b = Buildah(tmp_path_factory.mktemp("bootimages"))
    out = {}
    try:
        for name, (version, files) in BOOT_IMAGES.items():
            build(b, name, version, files, etc_extras=True)
            ref, digest = push(b, name, registry.address, "gzip")
            out[name] = BootImage(name, ref, digest, version)
    finally:
        b.close()
    return out


target = bootimages.target  # the fixture: a loop filesystem with root/ and esp/ directories


# --- to-filesystem ----------------------------------------------------------------------------------


def test_install_unified_from_registry(
    target: Target, boot_images: dict[str, BootImage], tmp_path: Path
) -> None:
    t, image = target, boot_images["boot-a"]
    r, w = os.pipe()
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "bootc_unified", "install", "to-filesystem", str(t.root)),
            *("--boot-esp", str(t.esp), "--tls-verify", "false", "--allow-missing-verity"),
            *("--experimental-unified-storage", "--karg", "bootc.test=1"),
            *("--source-imgref", image.docker, "--progress-fd", str(w)),
        ],
        capture_output=True,
        text=True,
        pass_fds=(w,),
    )
    os.close(w)
    with os.fdopen(r) as f:
        events = [json.loads(line) for line in f]
    assert proc.returncode == 0, proc.stderr
    depl_id = deployment_id(t)
    assert depl_id in proc.stdout and "unified" in proc.stdout and "bytes copied: 0" in proc.stdout
    assert events[0] == {"type": "Start", "version": "0.1.0"}
    tasks = {e.get("task") for e in events}
    assert {"pulling", "importing", "erofs"} <= tasks, tasks

    # The image is in the bootc store, as podman itself sees it.
    pm = podman_on(t.store, tmp_path / "podman")
    try:
        listed = pm.images()
        assert [image.ref] == [n for i in listed for n in i["Names"]]  # type: ignore[attr-defined]
        assert listed[0]["Digest"] == image.digest
        theirs = podman_tree(pm, image.ref)
        inspect = json.loads(pm("image", "inspect", image.ref))[0]
    finally:
        pm.close()
    # Zero-copy: objects share data with the store's files.
    assert_zero_copy(t, t.store, image.ref)

    # The kernel mounts the deployment's EROFS image and sees what podman sees.
    ours = mounted_image(t, depl_id, tmp_path / "mnt")
    ours.records[b"/"] = theirs.records[b"/"]
    assert differences(theirs, ours) == []

    # BLS entry: bootc's name, line order and options (root UUID per blkid, --karg, composefs=?, kargs.d).
    entry, _ = the_entry(t)
    assert entry.name == "bootc_bootc_test-1.0-1.conf"
    kdir = f"/EFI/Linux/bootc_composefs-{depl_id}"
    assert entry.read_text() == (
        "title Bootc Test 1.0\n"
        "version 1.0\n"
        f"linux {kdir}/vmlinuz\n"
        f"initrd {kdir}/initrd\n"
        f"options root=UUID={fs_uuid(t.fs.device)} rw bootc.test=1 composefs=?{depl_id} console=ttyS0 quiet\n"
        "sort-key bootc-bootc-test-0\n"
    )
    assert (t.esp / kdir.lstrip("/") / "vmlinuz").read_bytes() == KERNEL
    assert (t.esp / kdir.lstrip("/") / "initrd").read_bytes() == INITRAMFS
    efi = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi").read_bytes()
    assert (t.esp / "EFI/BOOT/BOOTX64.EFI").read_bytes() == efi
    assert (t.esp / "EFI/systemd/systemd-bootx64.efi").read_bytes() == efi
    assert (t.esp / "loader/loader.conf").is_file()

    # State: .origin, etc copy (without .updated), var link, var seed.
    state = t.root / "state/deploy" / depl_id
    assert (state / f"{depl_id}.origin").read_text() == (
        "[origin]\n"
        f"container-image-reference = ostree-unverified-image:docker://{image.ref}\n"
        "\n[boot]\nboot_type = bls\n"
        f"digest = {BOOT_DIGEST}\n"
        f"\n[image]\nmanifest_digest = {image.digest}\n"
    )
    assert sorted(os.listdir(state)) == sorted(["etc", "var", f"{depl_id}.origin"])
    assert os.readlink(state / "var") == "../../os/default/var"
    assert (state / "var").resolve() == (t.root / "state/os/default/var").resolve()
    etc = snapshot_dir(state / "etc")
    want = sub_snapshot(theirs, b"/etc", drop=(b"/.updated",))
    # removing .updated from the copy stamped its top directory's mtime; all else is the image's
    top = etc.records[b"/"]
    want.records[b"/"] = replace(want.records[b"/"], mtime=top.mtime, mtime_nsec=top.mtime_nsec)
    assert differences(want, etc) == []
    assert not (state / "etc/.updated").exists() and (b"/etc/.updated" in theirs.records)
    assert differences(sub_snapshot(theirs, b"/var"), snapshot_dir(t.root / "state/os/default/var")) == []
    assert permissions.problems(t.root) == []
    assert image_ref_name(f"localhost/bootc-{image.digest}") in "\n".join(
        run_cli("internals", "cfs", "--repo", t.root / "composefs", "ls-refs").stdout.splitlines()
    )

    # status: booted entry, image metadata from the repository, against podman inspect.
    doc = json.loads(status(t, depl_id, tmp_path, "--format", "json").stdout)
    booted = doc["status"]["booted"]
    assert doc["apiVersion"] == "org.containers.bootc/v1" and doc["kind"] == "BootcHost"
    assert doc["spec"] == {"image": {"image": image.ref, "transport": "registry"}, "bootOrder": "default"}
    assert doc["status"]["rollback"] is None and doc["status"]["staged"] is None
    assert doc["status"]["rollbackQueued"] is False and "otherDeployments" not in doc["status"]
    assert booted["image"]["imageDigest"] == image.digest == inspect["Digest"]
    assert booted["image"]["version"] == "1.0" == inspect["Annotations"][VERSION_ANNOTATION]
    assert booted["image"]["architecture"] == inspect["Architecture"]
    assert datetime.fromisoformat(
        booted["image"]["timestamp"].replace("Z", "+00:00")
    ) == datetime.fromisoformat(inspect["Created"].replace("Z", "+00:00"))
    assert booted["composefs"] == {
        "verity": depl_id,
        "bootType": "Bls",
        "bootloader": "systemd",
        "bootDigest": BOOT_DIGEST,
        "missingVerityAllowed": True,
    }
    assert booted["unified"] is True

    booted_only = json.loads(status(t, depl_id, tmp_path, "--format", "json", "--booted").stdout)
    assert booted_only["status"]["booted"] == booted
    yaml_text = status(t, depl_id, tmp_path, "--format", "yaml").stdout
    parsed = subprocess.run(
        ["/usr/bin/python3", "-c", "import json,sys,yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"],
        input=yaml_text,
        capture_output=True,
        text=True,
    )
    require(
        [] if parsed.returncode == 0 else [f"python3-yaml to check YAML: {parsed.stderr.strip()}"], "yaml"
    )
    assert json.loads(parsed.stdout) == doc
    human = status(t, depl_id, tmp_path, "--format", "humanreadable").stdout
    assert f"Booted image: {image.ref} (version 1.0)" in human and depl_id in human
    # Not booted from this root: no booted entry, the install is the default entry.
    other = json.loads(status(t, "0" * 128, tmp_path, "--format", "json").stdout)
    assert other["status"]["booted"] is None and other["status"]["rollback"]["composefs"]["verity"] == depl_id


def test_install_not_unified_from_registry(
    target: Target, boot_images: dict[str, BootImage], tmp_path: Path
) -> None:
    t, image = target, boot_images["boot-a"]
    # XFS needs no flag: as in bootc, verity is optional off ext4/btrfs (the entry says so with `?`).
    flags = [] if t.fs.kind == "xfs" else ["--allow-missing-verity"]
    out = install(t, *flags, "--source-imgref", image.docker).stdout
    depl_id = deployment_id(t)
    assert "not unified" in out
    (entry,) = (t.esp / "loader/entries").glob("*.conf")
    assert f" composefs=?{depl_id}" in entry.read_text()
    if t.fs.kind != "ext4":
        assert "bytes copied: 0" in out  # reflinked from the temporary store
    # The bootc store exists with its lock files, and holds nothing; no temporary store is left.
    assert (t.store / "overlay-images/images.lock").is_file()
    assert (t.store / "overlay-layers/layers.lock").is_file()
    assert os.listdir(t.root / "ostree/bootc") == ["storage"]
    pm = podman_on(t.store, tmp_path / "podman")
    try:
        assert pm.images() == []
    finally:
        pm.close()
    # The deployment is intact without the store: the image mounts and equals podman's view.
    oracle = ScratchPodman(tmp_path / "oracle")
    try:
        oracle("pull", "-q", "--tls-verify=false", image.ref)
        theirs = podman_tree(oracle, image.ref)
    finally:
        oracle.close()
    ours = mounted_image(t, depl_id, tmp_path / "mnt")
    ours.records[b"/"] = theirs.records[b"/"]
    assert differences(theirs, ours) == []
    doc = json.loads(status(t, depl_id, tmp_path, "--format", "json").stdout)
    assert doc["status"]["booted"]["unified"] is False
    assert doc["status"]["booted"]["image"]["imageDigest"] == image.digest


@pytest.fixture
def host_image(boot_images: dict[str, BootImage]) -> Iterator[str]:
    """boot-a in the host's own containers-storage under a name unique to this test."""
    name = f"localhost/bootc-unified-install-test-{os.getpid()}-{random.randrange(1 << 30)}:latest"
    run(["podman", "pull", "-q", "--tls-verify=false", boot_images["boot-a"].ref])
    run(["podman", "tag", boot_images["boot-a"].ref, name])
    yield name
    subprocess.run(["podman", "rmi", name], capture_output=True)
    subprocess.run(["podman", "rmi", boot_images["boot-a"].ref], capture_output=True)


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "not-unified"])
def test_install_from_containers_storage(
    target: Target, host_image: str, boot_images: dict[str, BootImage], unified: bool, tmp_path: Path
) -> None:
    t = target
    flags = ["--experimental-unified-storage"] if unified else []
    out = install(
        t, "--allow-missing-verity", "--source-imgref", f"containers-storage:{host_image}", *flags
    ).stdout
    depl_id = deployment_id(t)
    pm = podman_on(t.store, tmp_path / "podman")
    try:
        listed = pm.images()
        if unified:
            assert "bytes copied: 0" in out
            assert [host_image] == [n for i in listed for n in i["Names"]]  # type: ignore[attr-defined]
            assert_zero_copy(t, t.store, host_image)
        else:
            assert listed == []
    finally:
        pm.close()
    origin = (t.root / "state/deploy" / depl_id / f"{depl_id}.origin").read_text()
    # bootc: without --target-imgref the target is the source's name from a registry
    assert f"container-image-reference = ostree-unverified-image:docker://{host_image}\n" in origin
    doc = json.loads(status(t, depl_id, tmp_path, "--format", "json").stdout)
    booted = doc["status"]["booted"]
    assert booted["image"]["image"] == {"image": host_image, "transport": "registry"}
    assert booted["unified"] is unified
    # The registry's manifest digest, as the host's podman knows the image (a copy into the bootc
    # store stores a rewritten manifest beside the original; the image record still names this one).
    host_digest = json.loads(run(["podman", "image", "inspect", host_image]).stdout)[0]["Digest"]
    assert host_digest == boot_images["boot-a"].digest
    assert booted["image"]["imageDigest"] == host_digest
    # The installer's blob-info cache (compressed blob digest -> layer) went along, so the first
    # upgrade does not download the layers it has: the host's podman 4.3 keeps it in BoltDB.
    carried = (t.root / "state/os/default/var/lib/containers/cache/blob-info-cache-v1.boltdb").read_bytes()
    raw = run(["skopeo", "inspect", "--raw", "--tls-verify=false", boot_images["boot-a"].docker]).stdout
    blobs = [layer["digest"] for layer in json.loads(raw)["layers"]]
    assert blobs and all(d.encode() in carried for d in blobs)  # BoltDB keeps keys as raw bytes


@pytest.mark.fs("xfs", "ext4")
def test_second_deployment_shares_the_kernel_dir(
    target: Target, boot_images: dict[str, BootImage], tmp_path: Path
) -> None:
    t = target
    install(t, "--allow-missing-verity", "--source-imgref", boot_images["boot-a"].docker)
    first = deployment_id(t)
    (t.root / "state/os/default/var/lib/app/local-change").write_text("kept")
    install(t, "--allow-missing-verity", "--source-imgref", boot_images["boot-b"].docker)
    ids = set(os.listdir(t.root / "state/deploy"))
    assert len(ids) == 2 and first in ids
    (second,) = ids - {first}
    assert os.listdir(t.esp / "EFI/Linux") == [f"bootc_composefs-{first}"]
    entry_b = (t.esp / "loader/entries/bootc_bootc_test-2.0-1.conf").read_text()
    assert f"linux /EFI/Linux/bootc_composefs-{first}/vmlinuz\n" in entry_b
    assert f"composefs=?{second} " in entry_b
    assert (t.root / "state/os/default/var/lib/app/local-change").read_text() == "kept"  # seeded once
    # status: same sort-key, higher version first: boot-b is the default; booted boot-a -> queued.
    doc = json.loads(status(t, first, tmp_path, "--format", "json").stdout)
    assert doc["status"]["booted"]["composefs"]["verity"] == first
    assert doc["status"]["rollback"]["composefs"]["verity"] == second
    assert doc["status"]["rollbackQueued"] is True and doc["spec"]["bootOrder"] == "rollback"
    assert doc["status"]["rollback"]["softRebootCapable"] is True  # same kernel, same options
    # An entry whose origin went missing is still listed, and the problem is named.
    (t.root / "state/deploy" / second / f"{second}.origin").unlink()
    proc = status(t, first, tmp_path, "--format", "humanreadable")
    assert "Problem: deployment" in proc.stdout and "origin file is missing" in proc.stdout


# --- bad input: one line, nothing written ----------------------------------------------------------


@pytest.mark.fs("ext4")  # "no verity": the host kernel cannot enable it on ext4, where it is expected
def test_bad_input_one_line_nothing_written(
    target: Target, boot_images: dict[str, BootImage], registry: Registry
) -> None:
    t = target
    cases = {
        "missing image": (
            ["--allow-missing-verity", "--source-imgref", f"docker://{registry.address}/no/such:latest"],
            f"{registry.address}/no/such:latest",
        ),
        "no kernel": (
            ["--allow-missing-verity", "--source-imgref", boot_images["boot-nokernel"].docker],
            "has no kernel",
        ),
        "bad kargs.d": (
            ["--allow-missing-verity", "--source-imgref", boot_images["boot-badkargs"].docker],
            "/usr/lib/bootc/kargs.d/30-bad.toml: not valid TOML",
        ),
        "no verity": (["--source-imgref", boot_images["boot-a"].docker], "--allow-missing-verity"),
        "bad transport": (["--allow-missing-verity", "--source-imgref", "ftp://x/y"], "ftp://x/y"),
        "missing host image": (
            ["--allow-missing-verity", "--source-imgref", "containers-storage:localhost/none/such:1"],
            "localhost/none/such:1",
        ),
    }
    for what, (args, needle) in cases.items():
        proc = install(t, *args, check=False)
        err = proc.stderr.strip()
        assert proc.returncode == 1, (what, proc.stdout, err)
        assert "\n" not in err and needle in err, (what, err)
        assert listing(t.root) == [] and listing(t.esp) == [], what


# --- to-disk pre-flight refusals on real loop devices ------------------------------------------------


def sha256_of(device: str) -> str:
    h = hashlib.sha256()
    with open(device, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A 256 MiB loop device with known bytes, not mounted."""
    require([] if os.geteuid() == 0 else ["root"], "loop devices")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.write(blob("disk", 1 << 20) * 256)
    device = run(["losetup", "--find", "--show", image]).stdout.strip()
    yield device
    run(["losetup", "-d", device], check=False)


@pytest.mark.fs("ext4")
def test_to_disk_refusals(
    loopfs: LoopFs, loop_device: str, boot_images: dict[str, BootImage], tmp_path: Path
) -> None:
    src = ["--allow-missing-verity", "--tls-verify", "false", "--source-imgref", boot_images["boot-a"].docker]
    # Mounted read-only, so the kernel's own journal commits cannot change its bytes meanwhile.
    run(["mount", "-o", "remount,ro", loopfs.path])
    plain = tmp_path / "plain-file"
    plain.write_bytes(b"x" * 4096)
    used_image = tmp_path / "used.img"
    with open(used_image, "wb") as f:
        f.truncate(64 << 20)
    run(["mkfs.ext4", "-q", "-F", used_image])
    used = run(["losetup", "--find", "--show", used_image]).stdout.strip()
    cases = [
        (loop_device, ["--filesystem", "zfs"], "--filesystem zfs: unknown filesystem"),
        (str(plain), [], f"{plain}: not a block device"),
        (loopfs.device, [], f"{loopfs.device}: in use ("),
        (loop_device, [], f"{loop_device}: 256 MiB is too small"),
        (used, [], f"{used}: holds data (ext4); pass --wipe to erase it"),
        (used, ["--wipe"], f"{used}: 64 MiB is too small"),  # --wipe passes the check; nothing written yet
    ]
    try:
        for device, extra, needle in cases:
            before = sha256_of(device)
            proc = run_cli("install", "to-disk", device, *src, *extra, check=False)
            err = proc.stderr.strip()
            assert proc.returncode == 1 and "\n" not in err and needle in err, (device, needle, err)
            assert sha256_of(device) == before
    finally:
        run(["losetup", "-d", used], check=False)
