"""The ostree backend's sysroot: offline deployment of a zero-copy import, GC, `image set-unified
--backend ostree`, on loop btrfs/XFS/ext4.

Bootable images (testsupport/bootimages.py: a kernel + initramfs under /usr/lib/modules/<kver>/)
are built here and pushed to the local registry. Oracles: ostree's own view (`ostree admin status`,
`ostree ls -C` for each file's object checksum, `ostree refs`, `ostree fsck`), the BLS entry ostree
wrote and the kernel bytes we generated, stat inode numbers and link counts, FIEMAP shared extents,
statvfs, and podman's own view of the bootc store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bootc_unified.imgstore import ImageStore
from harness.checks import all_extents_shared, fiemap
from harness.loopfs import LoopFs
from harness.pytest_plugin import require
from harness.registry import Registry
from harness.testimages import Buildah, push
from harness.testimages import missing_prerequisites as images_missing
from testsupport import bootimages as ti
from testsupport.ostree_reference import ostree
from testsupport.plugin import run_cli
from testsupport.treeadd import sync_fs

pytestmark = pytest.mark.storage

Q = "usr/share/containers/systemd"
BOUND = "usr/lib/bootc/bound-images.d"


@pytest.fixture(scope="session")
def ostree_images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """name -> registry ref: ost-app (bound by ost-a), ost-stray, ost-a (1.0), ost-b (2.0)."""
    require(images_missing(), "building bootable test images")
    require([] if shutil.which("ostree") else ["ostree not found"], "the ostree backend")
    b = Buildah(tmp_path_factory.mktemp("ostreeimages"))
    out: dict[str, str] = {}
    try:
        for app in ("ost-app", "ost-stray"):
            ti.build(b, app, "1", {f"srv/{app}": ti.blob(app, 5000)})
            out[app], _ = push(b, app, registry.address, "gzip")
        unit = f"[Unit]\nDescription=app\n\n[Image]\nImage={out['ost-app']}\n".encode()
        files_a = {**ti.base_files("1.0"), **ti.KERNEL_FILES, f"{Q}/app.image": unit}
        ti.build(b, "ost-a", "1.0", files_a, {f"{BOUND}/app.image": f"/{Q}/app.image"}, etc_extras=True)
        out["ost-a"], _ = push(b, "ost-a", registry.address, "gzip")
        files_b = {**ti.base_files("2.0"), **ti.KERNEL_FILES, "usr/share/b-only": ti.blob("b", 70_000)}
        ti.build(b, "ost-b", "2.0", files_b, etc_extras=True)
        out["ost-b"], _ = push(b, "ost-b", registry.address, "gzip")
    finally:
        b.close()
    return out


# --- helpers -------------------------------------------------------------------------------------------


def ostree_cli(
    sysroot: Path, *args: str | os.PathLike[str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    return run_cli("internals", "ostree", "--sysroot", sysroot, *args, check=check)


def deploy(sysroot: Path, ref: str, *extra: str) -> dict[str, object]:
    doc = json.loads(ostree_cli(sysroot, "deploy", *extra, ref).stdout)
    assert isinstance(doc, dict)
    return doc


def repo(sysroot: Path) -> Path:
    return sysroot / "ostree/repo"


def object_checksum(sysroot: Path, commit: str, path: str) -> str:
    """The content checksum ostree itself lists for `path` in `commit`."""
    fields = ostree("ls", f"--repo={repo(sysroot)}", "-C", commit, path).split()
    return fields[-2]


def object_path(sysroot: Path, checksum: str) -> Path:
    return repo(sysroot) / "objects" / checksum[:2] / f"{checksum[2:]}.file"


def refs(sysroot: Path) -> set[str]:
    return set(ostree("refs", f"--repo={repo(sysroot)}").split())


def store_names(store: Path, tmp: Path) -> set[str]:
    pm = ti.podman_on(store, tmp / "podman-view")
    try:
        return {str(n) for i in pm.images() for n in (i.get("Names") or [])}  # type: ignore[attr-defined]
    finally:
        pm.close()


def diff_file_of(store: Path, data: bytes) -> Path:
    """The one diff/ file of the store holding exactly `data` (found by content, not by our code)."""
    found = [
        p
        for p in (store / "overlay").glob("*/diff/**/*")
        if p.is_file() and not p.is_symlink() and p.stat().st_size == len(data) and p.read_bytes() == data
    ]
    assert len(found) == 1, found
    return found[0]


# --- deployment --------------------------------------------------------------------------------------------


def set_unified_ostree(sysroot: Path) -> Any:
    """`image set-unified --backend ostree` on `sysroot`; its JSON result."""
    proc = run_cli(
        "image",
        "set-unified",
        "--backend",
        "ostree",
        "--sysroot",
        sysroot,
        "--tls-verify",
        "false",
        "--format",
        "json",
    )
    return json.loads(proc.stdout)


def test_deploy_is_a_real_ostree_deployment(
    loopfs: LoopFs, bootc_store: ImageStore, ostree_images: dict[str, str]
) -> None:
    sysroot = bootc_store.root.parent.parent.parent
    ref = ostree_images["ost-a"]
    bootc_store.pull(f"docker://{ref}", tls_verify=False)
    doc = deploy(sysroot, ref)
    depl, imported = doc["deployment"], doc["import"]
    assert isinstance(depl, dict) and isinstance(imported, dict)
    commit = str(depl["checksum"])
    assert imported["commit"] == commit

    # ostree's own view: one deployment of that commit, the default
    status = ostree("admin", "status", f"--sysroot={sysroot}")
    assert f"default {commit}.0" in status, status
    ostree("fsck", f"--repo={repo(sysroot)}")

    # the BLS entry names the deployment and boots our kernel
    entries = sorted((sysroot / "boot/loader/entries").glob("*.conf"))
    assert len(entries) == 1, entries
    fields = dict(line.split(" ", 1) for line in entries[0].read_text().splitlines() if " " in line)
    (karg,) = [a for a in fields["options"].split() if a.startswith("ostree=")]
    target = (sysroot / karg.removeprefix("ostree=").lstrip("/")).resolve()
    deploy_dir = sysroot / f"ostree/deploy/default/deploy/{commit}.0"
    assert target == deploy_dir.resolve()
    assert (sysroot / "boot" / fields["linux"].lstrip("/")).read_bytes() == ti.KERNEL
    assert (sysroot / "boot" / fields["initrd"].lstrip("/")).read_bytes() == ti.INITRAMFS
    assert "Bootc Test 1.0" in fields["title"]

    # bootc's origin
    origin = (deploy_dir.parent / f"{commit}.0.origin").read_text()
    assert f"container-image-reference=ostree-unverified-registry:{ref}" in origin.splitlines()

    # the deployed files are the repository's objects (hardlinks), the objects the store's files' data
    big = ti.base_files("1.0")["usr/share/big"]
    for rel, data in (("usr/share/big", big), ("usr/bin/tool", ti.base_files("1.0")["usr/bin/tool"])):
        st = os.lstat(deploy_dir / rel)
        obj = os.lstat(object_path(sysroot, object_checksum(sysroot, commit, f"/{rel}")))
        assert (st.st_dev, st.st_ino) == (obj.st_dev, obj.st_ino) and st.st_nlink >= 2, rel
        assert (deploy_dir / rel).read_bytes() == data
        diff = diff_file_of(bootc_store.root, data)
        if loopfs.kind == "ext4":
            assert os.stat(diff).st_ino == obj.st_ino, rel
        elif not all(e.inline for e in fiemap(deploy_dir / rel)):
            assert all_extents_shared(deploy_dir / rel) and all_extents_shared(diff), rel
    # /etc as ostree deploys it: /usr/etc merged into the deployment's /etc
    assert (deploy_dir / "etc/hostname").read_bytes() == b"bootc-test\n"
    assert (deploy_dir / "usr/etc/hostname").read_bytes() == b"bootc-test\n"

    # our own reading of the sysroot agrees
    listed = json.loads(ostree_cli(sysroot, "deployments").stdout)
    assert [(d["checksum"], d["imgref"]) for d in listed] == [(commit, f"registry:{ref}")]


def test_deploy_bad_input_one_line_nothing_left(
    loopfs: LoopFs, bootc_store: ImageStore, ostree_images: dict[str, str]
) -> None:
    sysroot = bootc_store.root.parent.parent.parent
    bootc_store.pull(f"docker://{ostree_images['ost-stray']}", tls_verify=False)  # no kernel
    proc = ostree_cli(sysroot, "deploy", ostree_images["ost-stray"], check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "deploying registry:" in lines[0] and "kernel" in lines[0].lower(), lines
    assert not any(r.startswith("ostree/container/image/") for r in refs(sysroot))
    assert os.listdir(sysroot / "ostree/deploy/default/deploy") == []
    proc = ostree_cli(sysroot, "gc", check=False)  # no deployment: GC refuses to remove everything
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "refusing" in proc.stderr
    proc = ostree_cli(sysroot, "deploy", "--os", "../x", ostree_images["ost-stray"], check=False)
    assert proc.returncode == 1 and "--os '../x'" in proc.stderr


def test_import_warns_of_dropped_entries(
    loopfs: LoopFs, bootc_store: ImageStore, test_images: object
) -> None:
    ref = test_images["features"].ref  # type: ignore[index]
    bootc_store.pull(ref, tls_verify=False)
    r = loopfs.path / "repo"
    run_cli("internals", "ostree", "--repo", r, "init")
    proc = run_cli("internals", "ostree", "--repo", r, "import", "--storage", bootc_store.root, ref)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "3 entries ostree cannot hold" in lines[0]
    first = json.loads(proc.stdout)["special_first"]
    assert first in ("special/fifo", "special/null", "nonutf8/caf\\xe9-latin1"), first
    assert repr(first) in lines[0]


# --- GC ----------------------------------------------------------------------------------------------------


def test_gc_keeps_what_deployments_need(
    loopfs: LoopFs, bootc_store: ImageStore, ostree_images: dict[str, str], tmp_path: Path
) -> None:
    sysroot = bootc_store.root.parent.parent.parent
    imgs = ostree_images
    for name in ("ost-a", "ost-b", "ost-app", "ost-stray"):
        bootc_store.pull(f"docker://{imgs[name]}", tls_verify=False)
    a = str(deploy(sysroot, imgs["ost-a"])["deployment"]["checksum"])  # type: ignore[index]
    b = str(deploy(sysroot, imgs["ost-b"])["deployment"]["checksum"])  # type: ignore[index]
    ref_a, ref_b = (f"ostree/container/image/{_esc(imgs[n])}" for n in ("ost-a", "ost-b"))
    big_a = object_path(sysroot, object_checksum(sysroot, a, "/usr/share/big"))
    big_b = object_path(sysroot, object_checksum(sysroot, b, "/usr/share/big"))
    # a stale image ref of an image no deployment runs (as after an upgrade whose deployment went)
    stray = json.loads(
        run_cli(
            "internals",
            "ostree",
            "--repo",
            repo(sysroot),
            "import",
            "--storage",
            bootc_store.root,
            imgs["ost-stray"],
        ).stdout
    )
    assert {ref_a, ref_b, str(stray["ref"])} <= refs(sysroot)

    # both deployed (b the default, a the rollback): only the stray image goes
    dry = json.loads(ostree_cli(sysroot, "gc", "--dry-run").stdout)
    assert [d["checksum"] for d in dry["deployments"]] == [b, a]
    assert dry["removed_refs"] == [stray["ref"]]
    assert [i["names"] for i in dry["removed_images"]] == [[imgs["ost-stray"]]]
    assert imgs["ost-app"] in dry["roots"]  # bound by a
    assert str(stray["ref"]) in refs(sysroot)  # dry run: nothing removed

    ostree("admin", "undeploy", f"--sysroot={sysroot}", "1")  # a goes
    assert f"{a}.0" not in ostree("admin", "status", f"--sysroot={sysroot}")
    report = json.loads(ostree_cli(sysroot, "gc").stdout)
    assert sorted(report["removed_refs"]) == sorted([ref_a, str(stray["ref"])])
    assert report["pruned_objects"] > 0
    left = refs(sysroot)
    assert ref_b in left and ref_a not in left and str(stray["ref"]) not in left
    assert any(
        r.startswith("ostree/") and not r.startswith("ostree/container") for r in left
    )  # deployment ref
    # a's commit and its own objects are gone; b's tree is whole
    assert subprocess.run(["ostree", "ls", f"--repo={repo(sysroot)}", a, "/"], capture_output=True).returncode
    assert not big_a.exists() and big_b.exists()
    ostree("ls", f"--repo={repo(sysroot)}", "-R", b)
    ostree("fsck", f"--repo={repo(sysroot)}")
    assert store_names(bootc_store.root, tmp_path) == {imgs["ost-b"]}
    # a second run removes nothing
    again = json.loads(ostree_cli(sysroot, "gc").stdout)
    assert again["removed_refs"] == [] and again["removed_images"] == [] and again["pruned_objects"] == 0


def _esc(name: str) -> str:
    from bootc_unified.ostree.importer import escape_for_ref

    return escape_for_ref(f"registry:{name}")


# --- set-unified -------------------------------------------------------------------------------------------


def test_set_unified_dedupes(
    loopfs: LoopFs, ostree_images: dict[str, str], sysroot: Path, tmp_path: Path
) -> None:
    ref = ostree_images["ost-a"]
    # installed without unified storage: imported from a temporary store that is then removed
    (loopfs.path / "tmp-sysroot").mkdir()
    tmp_store = ImageStore.ensure(loopfs.path / "tmp-sysroot")
    tmp_store.pull(f"docker://{ref}", tls_verify=False)
    commit = str(deploy(sysroot, ref, "--storage", str(tmp_store.root))["deployment"]["checksum"])  # type: ignore[index]
    tmp_store.cleanup_runtime()
    shutil.rmtree(loopfs.path / "tmp-sysroot")
    assert not (sysroot / "ostree/bootc/storage").exists()
    data = {rel: ti.base_files("1.0")[rel] for rel in ("usr/share/big", "usr/bin/tool")}
    data |= {rel: blob for rel, blob in ti.KERNEL_FILES.items()}
    file_bytes = sum(len(v) for v in data.values())

    sync_fs(loopfs.path)
    before = loopfs.statvfs_used_bytes()
    result = set_unified_ostree(sysroot)
    sync_fs(loopfs.path)
    grown = loopfs.statvfs_used_bytes() - before
    store = sysroot / "ostree/bootc/storage"
    try:
        assert result["source"] == "registry" and result["commit"] == commit
        assert ref in store_names(store, tmp_path)  # pulled by digest, tagged with the origin's name
        assert all(v["objects"] == 0 for k, v in result["objects"].items() if k != "already-present")
        dd = result["dedupe"]
        assert dd["method"] == ("hardlink" if loopfs.kind == "ext4" else "dedupe"), dd
        print(f"set-unified on {loopfs.kind}: grew {grown} B for {file_bytes} B of file data; {dd}")
        # the data the pull wrote again is given back: the sysroot grew by far less than the files
        assert grown < file_bytes // 2, (grown, file_bytes, dd)
        deploy_dir = sysroot / f"ostree/deploy/default/deploy/{commit}.0"
        for rel, blob in data.items():
            obj = object_path(sysroot, object_checksum(sysroot, commit, f"/{rel}"))
            diff = diff_file_of(store, blob)
            ost, dst = os.lstat(obj), os.lstat(diff)
            assert os.lstat(deploy_dir / rel).st_ino == ost.st_ino  # the deployment still is the object
            if loopfs.kind == "ext4":
                assert (dst.st_dev, dst.st_ino) == (ost.st_dev, ost.st_ino) and ost.st_nlink >= 3, rel
            elif not all(e.inline for e in fiemap(obj)):
                assert all_extents_shared(obj) and all_extents_shared(diff), rel
        ostree("fsck", f"--repo={repo(sysroot)}")
        # podman still reads the image whole (its own view of the files' bytes)
        pm = ti.podman_on(store, tmp_path / "podman-check")
        try:
            mnt = Path(pm("image", "mount", ref))
            try:
                for rel, blob in data.items():
                    assert (mnt / rel).read_bytes() == blob, rel
            finally:
                pm("image", "unmount", ref)
        finally:
            pm.close()

        # a second run changes nothing
        again = set_unified_ostree(sysroot)
        assert again["source"] == "already-present"
        assert again["dedupe"]["shared"]["files"] == 0, again["dedupe"]
    finally:
        ImageStore(store).cleanup_runtime()
