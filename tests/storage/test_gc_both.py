"""`internals gc` and `image list --type`: GC of both stores on real deployments made by
`install to-filesystem` (three into one root), with logically bound images pulled into the bootc
store and a system store whose image is built FROM a bootc-store image (podman#20603).

Oracles: podman's own `images` on the bootc store and on the system store (its own configuration),
`fsverity digest` of every object left (its name), the repository's fsck, the kernel mounting the
live EROFS image compared with podman's view of the image (harness/treecompare.py), and plain
directory listings of state/ and the ESP.

The install helpers and the `target` fixture come from harness/bootimages.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootc_unified.deploy.lbi import bound_images_of_erofs, pull_bound_images
from bootc_unified.imgstore import ImageStore
from bootc_unified.repository import Repository
from harness.pytest_plugin import require
from harness.registry import Registry
from harness.run import run
from harness.scratchpodman import ScratchPodman
from harness.testimages import Buildah, push
from harness.testimages import missing_prerequisites as images_missing
from harness.treecompare import differences
from testsupport import bootimages as ti
from testsupport.plugin import run_cli

target = ti.target  # the fixture: a loop filesystem with root/ and esp/ directories
Target = ti.Target

pytestmark = pytest.mark.storage

Q = "usr/share/containers/systemd"
BOUND = "usr/lib/bootc/bound-images.d"
OTHER_KERNEL = {
    f"usr/lib/modules/{ti.KVER}/vmlinuz": ti.blob("vmlinuz-a", 100_000),
    f"usr/lib/modules/{ti.KVER}/initramfs.img": ti.blob("initramfs-a", 50_000),
}


def _build(b: Buildah, name: str, files: dict[str, bytes], links: dict[str, str], version: str) -> None:
    ti.build(b, name, version, files, links)


@pytest.fixture(scope="session")
def gc_images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """name -> registry ref: app1..app3 and stray (tiny app images), gc-a/b/c (bootable; a binds
    app1 with its own kernel, b binds app2, c binds app3; b and c share a kernel)."""
    require(images_missing(), "building bootable test images")
    b = Buildah(tmp_path_factory.mktemp("gcimages"))
    out: dict[str, str] = {}
    try:
        apps = {}
        for app in ("app1", "app2", "app3", "stray"):
            _build(b, f"gc-{app}", {f"srv/{app}": ti.blob(app, 5000)}, {}, "1")
            out[app], _ = push(b, f"gc-{app}", registry.address, "gzip")
            apps[app] = out[app]
        boots = {
            "gc-a": ("1.0", OTHER_KERNEL, "app1", "image"),
            "gc-b": ("2.0", ti.KERNEL_FILES, "app2", "container"),
            "gc-c": ("3.0", ti.KERNEL_FILES, "app3", "image"),
        }
        for name, (version, kernel, app, kind) in boots.items():
            section = "Image" if kind == "image" else "Container"
            unit = f"[Unit]\nDescription={app}\n\n[{section}]\nImage={apps[app]}\n".encode()
            files = {**ti.base_files(version), **kernel, f"{Q}/{app}.{kind}": unit}
            _build(b, name, files, {f"{BOUND}/{app}.{kind}": f"/{Q}/{app}.{kind}"}, version)
            out[name], _ = push(b, name, registry.address, "gzip")
    finally:
        b.close()
    return out


# --- helpers ------------------------------------------------------------------------------------------


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def store_names(t: Target, tmp: Path) -> set[str]:
    pm = ti.podman_on(t.store, tmp / "podman-view")
    try:
        return {str(n) for i in pm.images() for n in (i.get("Names") or [])}  # type: ignore[attr-defined]
    finally:
        pm.close()


def gc_cli(t: Target, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "internals",
        "gc",
        "--sysroot",
        t.root,
        "--esp",
        t.esp,
        "--mountinfo",
        _mountinfo(t, None),
        "--staged-marker",
        t.root.parent / "no-marker",
        "--format",
        "json",
        *args,
        check=check,
    )


def _mountinfo(t: Target, booted: str | None) -> Path:
    """A mountinfo as a booted system has it (`/` = composefs:<booted>), or a plain one."""
    path = t.root.parent / f"mountinfo-{booted or 'none'}"
    root = f"overlay composefs:{booted} ro" if booted else "ext4 /dev/vda2 rw"
    path.write_text(f"36 1 0:40 / / ro,relatime shared:1 - {root}\n")
    return path


def deployment_of(t: Target, version: str) -> str:
    for d in os.listdir(t.root / "state/deploy"):
        text = (t.root / "state/deploy" / d / f"{d}.origin").read_text()
        if f"gc-{'abc'[int(version[0]) - 1]}" in text:
            return d
    raise AssertionError(f"no deployment of version {version}")


def objects_of(repo: Repository) -> set[str]:
    d = repo.path / "objects"
    return {p + q for p in os.listdir(d) if len(p) == 2 for q in os.listdir(d / p)}


def big_object(t: Target, version: str, tmp: Path) -> str:
    """The object id of usr/share/big of that version (a 1 MiB file unique to it), by `fsverity digest`."""
    f = tmp / f"big-{version}"
    f.write_bytes(ti.base_files(version)["usr/share/big"])
    out = run(["fsverity", "digest", "--hash-alg=sha512", "--compact", f]).stdout.split()[0]
    return out.removeprefix("sha512:")


# --- the test -------------------------------------------------------------------------------------------


@pytest.fixture
def system_store(target: Target, tmp_path: Path) -> Iterator[ScratchPodman]:
    """A scratch 'system' podman store under tmp with the bootc store as additional image store
    (the real /etc/containers and /var/lib/containers are never touched)."""
    extra = f"[storage.options]\nadditionalimagestores = [{json.dumps(str(target.store))}]\n"
    pm = ScratchPodman(tmp_path / "system", extra_storage_conf=extra)
    yield pm
    pm.close()


def test_gc_both_stores(
    target: Target, gc_images: dict[str, str], system_store: ScratchPodman, tmp_path: Path
) -> None:
    t, imgs = target, gc_images
    for name in ("gc-a", "gc-b", "gc-c"):
        ti.install(
            t,
            "--allow-missing-verity",
            "--experimental-unified-storage",
            "--source-imgref",
            f"docker://{imgs[name]}",
        )
    a, b, c = (deployment_of(t, v) for v in ("1.0", "2.0", "3.0"))
    repo = t.repo
    store = ImageStore(t.store)
    # Install pulled each deployment's bound image; upgrade/switch's pull finds them there.
    for depl in (a, b, c):
        bound = bound_images_of_erofs(repo.read_object(depl), repo.read_object)
        assert len(bound) == 1
        pulled = pull_bound_images(store, bound, tls_verify=False)
        assert [p.pulled for p in pulled] == [False]  # exists: not fetched again
    store.pull(f"docker://{imgs['stray']}", tls_verify=False)
    assert store_names(t, tmp_path) == {
        imgs[k] for k in ("gc-a", "gc-b", "gc-c", "app1", "app2", "app3", "stray")
    }
    assert sorted(os.listdir(t.esp / "EFI/Linux")) == sorted([f"bootc_composefs-{a}", f"bootc_composefs-{b}"])

    # podman#20603: the system's podman builds FROM gc-a, found in its additional image store.
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "extra").write_bytes(ti.blob("extra", 3000))
    (ctx / "Containerfile").write_text(f"FROM {imgs['gc-a']}\nCOPY extra /srv/extra\n")
    system_store("build", "--pull=never", "-q", "-t", "localhost/derived:1", str(ctx))
    sys_layers = json.loads((system_store.root / "overlay-layers/layers.json").read_text())
    bootc_layer_ids = {rec["id"] for rec in json.loads((t.store / "overlay-layers/layers.json").read_text())}
    (derived_top,) = sys_layers  # podman 4.3 keeps the base layer in the additional store:
    assert derived_top["parent"] in bootc_layer_ids, derived_top

    # Before: every deployment is live (three entries), nothing but the stray image would go.
    dry = json.loads(gc_cli(t, "--dry-run", "--system-store", str(system_store.root)).stdout)
    # Not booted from this root: the default entry (highest version) is the rollback.
    assert [(d["id"], d["role"]) for d in dry["live"]] == [(c, "rollback"), (b, "other"), (a, "other")]
    assert [v["names"] for v in dry["removed_images"]] == [[imgs["stray"]]]
    assert dry["removed_deployments"] == [] and dry["removed_kernel_dirs"] == []

    # Make a and b non-live: remove their entries (c's entry names b's kernel dir: shared bytes).
    for conf in (t.esp / "loader/entries").glob("*.conf"):
        if f"composefs=?{c}" not in conf.read_text():
            conf.unlink()
    assert (
        f"/EFI/Linux/bootc_composefs-{b}/vmlinuz"
        in next((t.esp / "loader/entries").glob("*.conf")).read_text()
    )
    store.remove(imgs["app3"])  # a live deployment's bound image removed by hand: tolerated

    sysroot_before, esp_before = listing(t.root), listing(t.esp)
    names_before, objects_before = store_names(t, tmp_path), objects_of(repo)
    dry = json.loads(gc_cli(t, "--dry-run", "--system-store", str(system_store.root)).stdout)
    assert (listing(t.root), listing(t.esp)) == (sysroot_before, esp_before)
    assert (store_names(t, tmp_path), objects_of(repo)) == (names_before, objects_before)
    assert sorted(dry["removed_deployments"]) == sorted([a, b])
    assert dry["removed_kernel_dirs"] == [f"bootc_composefs-{a}"]
    assert sorted(n for v in dry["removed_images"] for n in v["names"]) == sorted(
        [imgs["gc-b"], imgs["app1"], imgs["app2"], imgs["stray"]]
    )
    kept = {n: v["reasons"] for v in dry["kept_images"] for n in v["names"]}
    assert kept[imgs["gc-c"]] == [f"host image of the rollback deployment {c[:12]}"]
    assert len(kept[imgs["gc-a"]]) == 1 and "system-store image localhost/derived:1" in kept[imgs["gc-a"]][0]
    assert dry["missing_images"] == [f"{imgs['app3']} (bound in the rollback deployment {c[:12]})"]
    assert big_object(t, "1.0", tmp_path) in dry["repository"]["objects"]
    assert big_object(t, "3.0", tmp_path) not in dry["repository"]["objects"]

    # image list: bootc's shapes plus the reason GC keeps each image.
    rows = json.loads(
        run_cli(
            "image",
            "list",
            "--sysroot",
            t.root,
            "--esp",
            t.esp,
            "--mountinfo",
            _mountinfo(t, None),
            "--system-store",
            system_store.root,
            "--type",
            "all",
            "--format",
            "json",
        ).stdout
    )
    by = {(r["image_type"], r["image"]): r["kept_because"] for r in rows}
    assert set(by) == {
        ("host", imgs["gc-c"]),
        ("logical", imgs["app3"]),
        *(("unified", imgs[k]) for k in ("gc-a", "gc-b", "gc-c", "app1", "app2", "stray")),
    }
    assert by[("unified", imgs["stray"])] == [] and by[("unified", imgs["gc-a"])] == kept[imgs["gc-a"]]
    table = run_cli(
        "image",
        "list",
        "--sysroot",
        t.root,
        "--esp",
        t.esp,
        "--mountinfo",
        _mountinfo(t, None),
        "--system-store",
        system_store.root,
        "--type",
        "logical",
    ).stdout.splitlines()
    assert table[0].split()[:2] == ["REPOSITORY", "TYPE"] and len(table) == 2
    assert table[1].split()[:2] == [imgs["app3"], "logical"]

    # The booted deployment is never collected: booted a (no entry names it) -> refused, one line.
    proc = run_cli(
        "internals",
        "gc",
        "--sysroot",
        t.root,
        "--esp",
        t.esp,
        "--mountinfo",
        _mountinfo(t, a),
        "--staged-marker",
        t.root.parent / "no-marker",
        check=False,
    )
    assert proc.returncode == 1 and "\n" not in proc.stderr.strip() and a in proc.stderr, proc.stderr
    assert (listing(t.root), listing(t.esp)) == (sysroot_before, esp_before)

    # The real run, booted c.
    done = json.loads(
        run_cli(
            "internals",
            "gc",
            "--sysroot",
            t.root,
            "--esp",
            t.esp,
            "--mountinfo",
            _mountinfo(t, c),
            "--staged-marker",
            t.root.parent / "no-marker",
            "--system-store",
            system_store.root,
            "--format",
            "json",
        ).stdout
    )
    assert sorted(done["removed_deployments"]) == sorted([a, b])
    assert os.listdir(t.root / "state/deploy") == [c]
    assert os.listdir(t.esp / "EFI/Linux") == [f"bootc_composefs-{b}"]  # shared with c: kept
    assert store_names(t, tmp_path) == {imgs["gc-a"], imgs["gc-c"]}
    assert done["repository"]["removed_objects"] == dry["repository"]["removed_objects"]
    left = objects_of(repo)
    assert big_object(t, "1.0", tmp_path) not in left and big_object(t, "2.0", tmp_path) not in left
    assert big_object(t, "3.0", tmp_path) in left
    fsck = run_cli("internals", "cfs", "--repo", t.root / "composefs", "fsck")
    assert fsck.returncode == 0, fsck.stdout
    digests = run(
        [
            "fsverity",
            "digest",
            "--hash-alg=sha512",
            "--compact",
            *(repo.objects.path_of(o) for o in sorted(left)),
        ]
    ).stdout.split()
    assert [d.removeprefix("sha512:") for d in digests] == sorted(left)

    # c still mounts and equals podman's view; the derived system image still works.
    pm = ti.podman_on(t.store, tmp_path / "podman-c")
    try:
        theirs = ti.podman_tree(pm, imgs["gc-c"])
    finally:
        pm.close()
    ours = ti.mounted_image(t, c, tmp_path / "mnt")
    ours.records[b"/"] = theirs.records[b"/"]
    assert differences(theirs, ours) == []
    mnt = Path(system_store("image", "mount", "localhost/derived:1"))
    try:
        assert (mnt / "srv/extra").read_bytes() == ti.blob("extra", 3000)
        assert (mnt / "usr/share/big").read_bytes() == ti.base_files("1.0")["usr/share/big"]
    finally:
        system_store("image", "unmount", "localhost/derived:1")

    # Idempotent: a second run removes nothing.
    sysroot_after, esp_after = listing(t.root), listing(t.esp)
    again = json.loads(
        run_cli(
            "internals",
            "gc",
            "--sysroot",
            t.root,
            "--esp",
            t.esp,
            "--mountinfo",
            _mountinfo(t, c),
            "--staged-marker",
            t.root.parent / "no-marker",
            "--system-store",
            system_store.root,
            "--format",
            "json",
        ).stdout
    )
    assert again["removed_deployments"] == again["removed_kernel_dirs"] == again["removed_images"] == []
    assert again["repository"]["removed_objects"] == 0 and again["removed_refs"] == []
    assert (listing(t.root), listing(t.esp)) == (sysroot_after, esp_after)

    # Once the system image is gone, gc-a is no longer kept.
    system_store("rmi", "localhost/derived:1")
    # As on a booted system, /sysroot is a read-only bind of the physical root: GC makes it
    # writable in its own mount namespace only.
    run(["mount", "--bind", str(t.root), str(t.root)])
    try:
        run(["mount", "-o", "remount,bind,ro", str(t.root)])
        last = json.loads(gc_cli(t, "--system-store", str(system_store.root)).stdout)
        assert os.statvfs(t.root).f_flag & os.ST_RDONLY  # still read-only out here
    finally:
        run(["umount", str(t.root)])
    assert [v["names"] for v in last["removed_images"]] == [[imgs["gc-a"]]]
    assert store_names(t, tmp_path) == {imgs["gc-c"]}

    # Why: without that root, the derived image breaks (what bootc's GC would do to it).
    store.pull(f"docker://{imgs['app1']}", tls_verify=False)
    (ctx / "Containerfile").write_text(f"FROM {imgs['app1']}\nCOPY extra /srv/extra\n")
    system_store("build", "--pull=never", "-q", "-t", "localhost/derived-app1:1", str(ctx))
    store.remove(imgs["app1"])
    broken = subprocess.run(
        ["podman", "image", "mount", "localhost/derived-app1:1"],
        capture_output=True,
        text=True,
        env=system_store.env,
    )
    # podman 4.3 on the host: "Can't stat lower layer ..."; the trixie guest's podman: "layer not known"
    assert broken.returncode != 0, broken
    assert "layer not known" in broken.stderr or "lower layer" in broken.stderr, broken.stderr
