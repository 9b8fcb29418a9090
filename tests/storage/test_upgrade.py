"""`upgrade` and `switch` on a loop sysroot (btrfs/XFS/ext4) booted by a hand-written mountinfo:
small bootable images (harness/bootimages.py) pushed to the local registry, one repository per
test whose tag is moved from v1 to v2 with `skopeo copy --preserve-digests`.

Oracles: the registry's manifest digests (skopeo), podman's own view of the bootc store, the
object-by-object zero-copy audit (inode identity / FIEMAP, harness/zerocopy_audit.py), two
repositories compared file by file (bytes and link targets), plain listings of the sysroot and
the ESP before and after a refusal, and the kernel's own mount table for /run/nextroot.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from bootc_unified.deploy.sysroot import mounts
from harness.pytest_plugin import require
from harness.registry import Registry
from harness.run import run
from harness.testimages import Buildah, push
from harness.testimages import missing_prerequisites as images_missing
from harness.zerocopy_audit import audit
from testsupport import bootimages, permissions
from testsupport.bootimages import (
    KERNEL_FILES,
    KVER,
    BootImage,
    Target,
    base_files,
    blob,
    booted_mountinfo,
    build,
    deployment_id,
    diff_inodes,
    install,
    listing,
    podman_on,
    status,
)
from testsupport.plugin import run_cli

pytestmark = pytest.mark.storage

target = bootimages.target  # the fixture: a loop filesystem with root/ and esp/ directories

BOUND = "usr/lib/bootc/bound-images.d"
# another OS: its ID sorts after bootc-test's, so its sort-key group does too
ALT_OS_RELEASE = b'NAME="Bootc Alt"\nID=bootc-test-alt\nVERSION_ID=9.0\nPRETTY_NAME="Bootc Alt 9.0"\n'
Q = "usr/share/containers/systemd"
OTHER_KERNEL = {
    f"usr/lib/modules/{KVER}/vmlinuz": blob("vmlinuz-alt", 200_000),
    f"usr/lib/modules/{KVER}/initramfs.img": blob("initramfs-alt", 80_000),
}


def _files(version: str, kernel: dict[str, bytes], extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    return {**base_files(version), **kernel, **(extra or {})}


def _bound(app_ref: str) -> tuple[dict[str, bytes], dict[str, str]]:
    unit = f"[Unit]\nDescription=app\n\n[Image]\nImage={app_ref}\n".encode()
    return {f"{Q}/app.image": unit}, {f"{BOUND}/app.image": f"/{Q}/app.image"}


@pytest.fixture(scope="session")
def upd_images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, BootImage]:
    """v1, v2 (same kernel and kargs: soft-reboot capable), v2app (binds app), v2bad (binds an
    image the registry lacks), alt (another kernel), app (a tiny app image)."""
    require(images_missing(), "building bootable test images")
    b = Buildah(tmp_path_factory.mktemp("updimages"))
    out = {}
    try:
        build(b, "upd-app", "1", {"srv/app": blob("app", 5000)})
        app_ref, app_digest = push(b, "upd-app", registry.address, "gzip")
        out["app"] = BootImage("upd-app", app_ref, app_digest, "1")
        good, good_links = _bound(app_ref)
        bad, bad_links = _bound(f"{registry.address}/upd/no-such-app:latest")
        v2_only = {"usr/share/v2-only": blob("v2-only", 70_000)}
        images: dict[str, tuple[str, dict[str, bytes], dict[str, str]]] = {
            "v1": ("1.0", _files("1.0", KERNEL_FILES), {}),
            "v2": ("2.0", _files("2.0", KERNEL_FILES, v2_only), {}),
            "v2app": ("2.1", _files("2.1", KERNEL_FILES, {**v2_only, **good}), good_links),
            "v2bad": ("2.2", _files("2.2", KERNEL_FILES, bad), bad_links),
            "alt": ("9.0", _files("9.0", OTHER_KERNEL, {"usr/lib/os-release": ALT_OS_RELEASE}), {}),
        }
        for name, (version, files, links) in images.items():
            build(b, f"upd-{name}", version, files, links, dirs=("sysroot",))
            ref, digest = push(b, f"upd-{name}", registry.address, "gzip")
            out[name] = BootImage(f"upd-{name}", ref, digest, version)
    finally:
        b.close()
    return out


# --- helpers ------------------------------------------------------------------------------


def repo_for(registry: Registry, request: pytest.FixtureRequest, what: str = "os") -> str:
    """A registry repository of this test's own (tags moved by retag)."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    return f"{registry.address}/upd/{name}/{what}:latest"


def install_v1(
    t: Target, imgs: dict[str, BootImage], registry: Registry, request: pytest.FixtureRequest, *flags: str
) -> tuple[str, str]:
    """v1 installed from this test's own registry repository: (that reference, the deployment id)."""
    ref = repo_for(registry, request)
    retag(imgs["v1"], ref)
    install(t, "--allow-missing-verity", *flags, "--source-imgref", f"docker://{ref}")
    return ref, deployment_id(t)


def retag(src: BootImage, dest: str) -> None:
    run(
        [
            *("skopeo", "copy", "--quiet", "--preserve-digests"),
            *("--src-tls-verify=false", "--dest-tls-verify=false"),
            f"docker://{src.ref}",
            f"docker://{dest}",
        ]
    )


def cli(
    verb: str, t: Target, booted: str, tmp: Path, *args: str | Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`upgrade`/`switch` as booted from `booted`, on the loop sysroot, without systemd."""
    return run_cli(
        verb,
        *args,
        *("--sysroot", t.root, "--esp", t.esp, "--mountinfo", booted_mountinfo(booted, tmp)),
        *("--staged-marker", tmp / "staged-deployment", "--etc", t.root / "state/deploy" / booted / "etc"),
        *("--system-store", tmp / "no-system-store", "--no-systemd", "--tls-verify", "false"),
        check=check,
    )


def doc(t: Target, booted: str, tmp: Path) -> dict[str, object]:
    out: dict[str, object] = json.loads(
        status(t, booted, tmp, "--format", "json", marker=tmp / "staged-deployment").stdout
    )
    return out


def slot(d: dict[str, object], name: str) -> dict[str, object]:
    value = d["status"][name]  # type: ignore[index]
    assert isinstance(value, dict), (name, d)
    return value


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == 1, (proc.stdout, err)
    assert "\n" not in err and all(n in err for n in needles), err


def staged_id(tmp: Path) -> str:
    marker = json.loads((tmp / "staged-deployment").read_text())
    return str(marker["depl_id"])


def snapshot(t: Target, tmp: Path, full: bool = False) -> tuple[list[str], list[str], bool]:
    """The sysroot (not `full`: the repository by its refs only, as content nothing names waits
    for GC), the ESP and whether a staged marker exists."""
    root = [p for p in listing(t.root) if full or not p.startswith("composefs/") or "/refs" in p]
    return root, listing(t.esp), (tmp / "staged-deployment").exists()


def objects(t: Target) -> set[str]:
    return {os.path.realpath(p) for p in (t.root / "composefs/objects").rglob("*") if p.is_file()}


def repo_content(repo: Path) -> dict[str, str]:
    """Every file (sha256 of its bytes) and symlink (target) of a repository, by relative path."""
    out = {}
    for path in repo.rglob("*"):
        rel = str(path.relative_to(repo))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# --- upgrade, unified ------------------------------------------------------------------------------


def test_upgrade_unified(
    target: Target,
    upd_images: dict[str, BootImage],
    registry: Registry,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    t, imgs = target, upd_images
    ref, a = install_v1(t, imgs, registry, request, "--experimental-unified-storage")

    # --check: nothing new, then v2 is announced with its registry digest; nothing is written.
    before = snapshot(t, tmp_path, full=True)
    assert cli("upgrade", t, a, tmp_path, "--check").stdout == f"No changes in: {ref}\n"
    retag(imgs["v2app"], ref)
    out = cli("upgrade", t, a, tmp_path, "--check").stdout
    assert out == f"Update available for: {ref}\n  Digest: {imgs['v2app'].digest}\n"
    assert snapshot(t, tmp_path, full=True) == before

    objects_before = objects(t)
    out = cli("upgrade", t, a, tmp_path).stdout
    assert out.startswith("Pull path: unified\n"), out
    b = staged_id(tmp_path)
    assert f"  Deployment: {b}\n" in out and f"  Digest: {imgs['v2app'].digest}\n" in out
    assert "Bound images: 1 pulled, 0 present\n" in out and "\nGC: removed 0 deployments" in out
    assert json.loads((tmp_path / "staged-deployment").read_text()) == {
        "depl_id": b,
        "finalization_locked": False,
    }

    d = doc(t, a, tmp_path)
    staged, booted = slot(d, "staged"), slot(d, "booted")
    assert staged["composefs"]["verity"] == b and booted["composefs"]["verity"] == a  # type: ignore[index]
    assert staged["pullPath"] == "unified" and staged["unified"] is True
    assert "pullPath" not in booted and booted["unified"] is True  # installed: no pull path recorded
    assert staged["image"]["imageDigest"] == imgs["v2app"].digest  # type: ignore[index]
    assert d["spec"]["image"] == {"image": ref, "transport": "registry"}  # type: ignore[index]
    origin = (t.root / "state/deploy" / b / f"{b}.origin").read_text()
    assert origin.endswith("\n[bootc-unified]\npull-path = unified\n"), origin
    assert f"container-image-reference = ostree-unverified-image:docker://{ref}\n" in origin

    # podman's view: v2app under the name, v1 kept by digest (the booted image), the LBI pulled.
    pm = podman_on(t.store, tmp_path / "podman")
    try:
        listed = pm.images()
    finally:
        pm.close()
    by_digest = {str(i["Digest"]): [str(n) for n in (i.get("Names") or [])] for i in listed}  # type: ignore[union-attr]
    assert by_digest[imgs["v2app"].digest] == [ref]
    assert imgs["v1"].digest in by_digest and by_digest[imgs["app"].digest] == [imgs["app"].ref]
    # zero-copy: every object is accounted for by the kernel's view (inode identity on ext4, FIEMAP
    # extents on btrfs/XFS); those this upgrade added share data with the new image's diff files
    result = audit(t.root / "composefs", t.store)
    assert result.unaccounted == {}, result.unaccounted
    new_objects = objects(t) - objects_before
    shared = set(result.hardlinked if t.fs.kind == "ext4" else result.reflinked)
    new_data = new_objects - set(result.metadata) - set(result.inline)
    assert new_data and new_data <= shared, new_data - shared
    v2_diffs = {os.path.realpath(p) for p in diff_inodes(t.store, ref).values()}
    assert len(new_data) <= len(v2_diffs)
    assert permissions.problems(t.root) == []  # what the upgrade added is private as well

    # Again: the same image is staged already.
    staged_before = snapshot(t, tmp_path)
    out = cli("upgrade", t, a, tmp_path).stdout
    assert out == f"Pull path: unified\nNo changes in {ref}\n"
    assert snapshot(t, tmp_path) == staged_before


def test_upgrade_pulls_again_a_layer_a_power_cut_emptied(
    target: Target,
    upd_images: dict[str, BootImage],
    registry: Registry,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    """What the power-cut scenario met on ext4: an upgrade pulled v2 into the bootc store and the
    power went before a new layer's files reached the disk (the layer recorded whole, a file of
    its diff/ empty). podman pulls nothing for a layer it has, so the re-run's import failed its
    DiffID check. Now upgrade drops the image, pulls it again and imports it, with one warning
    line. Truncating the file here stands in for the cut (tests/vm/test_power_cut.py makes real
    ones). Oracles: the bytes v2 was built from vs the file podman's store holds afterwards, the
    staged deployment."""
    t, imgs = target, upd_images
    ref, a = install_v1(t, imgs, registry, request, "--experimental-unified-storage")
    retag(imgs["v2"], ref)
    pm = podman_on(t.store, tmp_path / "podman")
    try:
        pm("pull", "--tls-verify=false", ref)
    finally:
        pm.close()
    victim = next(p for p in diff_inodes(t.store, ref).values() if str(p).endswith("/usr/share/v2-only"))
    victim.write_bytes(b"")

    proc = cli("upgrade", t, a, tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    warnings = proc.stderr.strip().splitlines()
    assert len(warnings) == 1 and "v2-only" in warnings[0] and f"pulling {ref} again" in warnings[0], warnings
    b = staged_id(tmp_path)
    assert f"  Deployment: {b}\n" in proc.stdout and f"  Digest: {imgs['v2'].digest}\n" in proc.stdout
    again = next(p for p in diff_inodes(t.store, ref).values() if str(p).endswith("/usr/share/v2-only"))
    assert again.read_bytes() == blob("v2-only", 70_000)
    assert slot(doc(t, a, tmp_path), "staged")["image"]["imageDigest"] == imgs["v2"].digest  # type: ignore[index]


# --- direct path, and both paths give the same repository ---


def test_direct_and_unified_give_identical_repositories(
    target: Target,
    upd_images: dict[str, BootImage],
    registry: Registry,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    t, imgs = target, upd_images
    ref = repo_for(registry, request)
    retag(imgs["v1"], ref)
    u = Target(t.fs, t.fs.path / "root-unified", t.fs.path / "esp-unified")
    u.root.mkdir()
    u.esp.mkdir()
    try:
        install(t, "--allow-missing-verity", "--source-imgref", f"docker://{ref}")
        install(
            u,
            "--allow-missing-verity",
            "--experimental-unified-storage",
            "--source-imgref",
            f"docker://{ref}",
        )
        a = deployment_id(t)
        assert deployment_id(u) == a
        retag(imgs["v2"], ref)

        store_before = listing(t.store)
        (tmp_path / "t").mkdir()
        (tmp_path / "u").mkdir()
        out_t = cli("upgrade", t, a, tmp_path / "t").stdout
        out_u = cli("upgrade", u, a, tmp_path / "u").stdout
        assert out_t.startswith("Pull path: direct\n") and out_u.startswith("Pull path: unified\n")
        b = staged_id(tmp_path / "t")
        assert staged_id(tmp_path / "u") == b  # the same EROFS image id

        # direct: the bootc store untouched (same files, podman sees no image), no temporary store left
        assert listing(t.store) == store_before and os.listdir(t.root / "ostree/bootc") == ["storage"]
        pm = podman_on(t.store, tmp_path / "podman")
        try:
            assert pm.images() == []
        finally:
            pm.close()
        staged = slot(doc(t, a, tmp_path / "t"), "staged")
        assert staged["pullPath"] == "direct" and staged["unified"] is False
        assert slot(doc(u, a, tmp_path / "u"), "staged")["pullPath"] == "unified"

        # byte-identical repositories: objects, splitstreams, images and refs
        ours, theirs = repo_content(t.root / "composefs"), repo_content(u.root / "composefs")
        assert ours == theirs
        assert f"images/{b}" in ours and any(k.startswith("objects/") for k in ours)
    finally:
        subprocess.run(["umount", "-R", str(u.store / "overlay")], capture_output=True)


# --- refusals: nothing staged ------------------------------------------------------------------------------


def test_disk_space_refusal_stages_nothing(
    target: Target,
    upd_images: dict[str, BootImage],
    registry: Registry,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    t, imgs = target, upd_images
    ref, a = install_v1(t, imgs, registry, request)
    retag(imgs["v2"], ref)
    filler = t.fs.path / "filler"
    keep = 512 * 1024  # the new layer is ~1.7 MB (random bytes do not compress)
    for n in range(8):  # btrfs gives back less than statvfs promised: fill in steps
        st = os.statvfs(t.root)
        size = st.f_bavail * st.f_bsize - keep
        if size <= 0:
            break
        part = filler.with_name(f"filler{n}")
        proc = subprocess.run(["fallocate", "-l", str(size), part], capture_output=True, text=True)
        if proc.returncode != 0:
            subprocess.run(["fallocate", "-l", str(size // 2), part], capture_output=True)
        run(["sync", "-f", t.root])
    free = os.statvfs(t.root).f_bavail * os.statvfs(t.root).f_bsize
    assert free < 1_500_000, free
    before = snapshot(t, tmp_path, full=True)
    proc = cli("upgrade", t, a, tmp_path, check=False)
    one_line_error(proc, f"image {ref}: needs ", "bytes free")
    assert snapshot(t, tmp_path, full=True) == before
    for part in t.fs.path.glob("filler*"):
        part.unlink()


def test_unpullable_bound_image_stages_nothing(
    target: Target,
    upd_images: dict[str, BootImage],
    registry: Registry,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    t, imgs = target, upd_images
    ref, a = install_v1(t, imgs, registry, request)
    refs_before = run_cli("internals", "cfs", "--repo", t.root / "composefs", "ls-refs").stdout
    retag(imgs["v2bad"], ref)
    before = listing(t.esp)
    proc = cli("upgrade", t, a, tmp_path, check=False)
    one_line_error(proc, f"bound image {registry.address}/upd/no-such-app:latest", f"/{BOUND}/app.image")
    assert listing(t.esp) == before and not (tmp_path / "staged-deployment").exists()
    assert os.listdir(t.root / "state/deploy") == [a]
    # the new image's ref went again (its objects wait for GC)
    assert run_cli("internals", "cfs", "--repo", t.root / "composefs", "ls-refs").stdout == refs_before


# --- download-only ------------------------------------------------------------------------------------------


def test_download_only_then_from_downloaded(
    target: Target,
    upd_images: dict[str, BootImage],
    registry: Registry,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    t, imgs = target, upd_images
    ref, a = install_v1(t, imgs, registry, request)
    proc = cli("upgrade", t, a, tmp_path, "--from-downloaded", check=False)
    one_line_error(proc, "no download-only staged deployment")
    retag(imgs["v2"], ref)
    out = cli("upgrade", t, a, tmp_path, "--download-only").stdout
    assert "Download-only" in out
    b = staged_id(tmp_path)
    assert json.loads((tmp_path / "staged-deployment").read_text())["finalization_locked"] is True
    assert slot(doc(t, a, tmp_path), "staged")["downloadOnly"] is True
    # the finalize step leaves a locked staging alone (what the unit's ExecStop runs)
    fin = run_cli(
        *("internals", "finalize-staged", "--sysroot", t.root, "--esp", t.esp),
        *("--mountinfo", booted_mountinfo(a, tmp_path), "--staged-marker", tmp_path / "staged-deployment"),
        *("--etc", t.root / "state/deploy" / a / "etc"),
    )
    assert fin.stdout == f"Staged deployment {b} is download-only; not finalizing\n"

    out = cli("upgrade", t, a, tmp_path, "--from-downloaded").stdout
    assert out == f"Unlocked staged deployment {b}: it is finalized at shutdown\n"
    assert json.loads((tmp_path / "staged-deployment").read_text()) == {
        "depl_id": b,
        "finalization_locked": False,
    }
    assert slot(doc(t, a, tmp_path), "staged")["downloadOnly"] is False
    one_line_error(cli("upgrade", t, a, tmp_path, "--from-downloaded", check=False), "no download-only")
    proc = cli("upgrade", t, a, tmp_path, "--check", "--apply", check=False)
    one_line_error(proc, "--check cannot be combined")


# --- switch ------------------------------------------------------------------------------


def test_switch(
    target: Target,
    upd_images: dict[str, BootImage],
    registry: Registry,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    t, imgs = target, upd_images
    ref, alt, alt2 = (repo_for(registry, request, w) for w in ("os", "alt", "alt-copy"))
    retag(imgs["v1"], ref)
    retag(imgs["alt"], alt)
    retag(imgs["alt"], alt2)
    install(t, "--allow-missing-verity", "--source-imgref", f"docker://{ref}")
    a = deployment_id(t)
    assert cli("switch", t, a, tmp_path, ref).stdout == "Image specification is unchanged.\n"

    # alt boots another kernel: a soft reboot is impossible; required refuses before staging
    before = snapshot(t, tmp_path)
    proc = cli("switch", t, a, tmp_path, "--soft-reboot", "required", alt, check=False)
    one_line_error(proc, f"cannot soft-reboot into {alt}: the kernel or initramfs differs")
    assert snapshot(t, tmp_path) == before

    out = cli("switch", t, a, tmp_path, "--experimental-unified-storage", "--soft-reboot", "auto", alt).stdout
    assert out.startswith("Pull path: unified\n") and f"Queued for next boot: docker://{alt}\n" in out
    assert f"Not soft-rebooting into {alt}: the kernel or initramfs differs from the booted one\n" in out
    b = staged_id(tmp_path)
    d = doc(t, a, tmp_path)
    assert d["spec"]["image"] == {"image": alt, "transport": "registry"}  # type: ignore[index]
    staged = slot(d, "staged")
    assert staged["image"]["image"] == {"image": alt, "transport": "registry"}  # type: ignore[index]
    assert staged["pullPath"] == "unified" and staged["softRebootCapable"] is False
    origin = (t.root / "state/deploy" / b / f"{b}.origin").read_text()
    assert f"container-image-reference = ostree-unverified-image:docker://{alt}\n" in origin
    # systemd-boot picks the lowest sort-key: the new OS's entry, though its ID sorts after the old
    keys = {}
    for conf in (t.esp / "loader/entries.staged").iterdir():
        fields = dict(line.split(" ", 1) for line in conf.read_text().splitlines() if " " in line)
        keys[fields["sort-key"]] = fields["options"]
    assert sorted(keys) == ["bootc-bootc-test-alt-0", "bootc-bootc-test-alt-1"]
    assert f"composefs=?{b}" in keys["bootc-bootc-test-alt-0"].split()
    assert f"manifest_digest = {imgs['alt'].digest}\n" in origin
    # the staged spec is the current one now
    assert cli("switch", t, a, tmp_path, alt).stdout == "Image specification is unchanged.\n"
    # identical content under another reference: refused (bootc's rule), staging unchanged
    before = snapshot(t, tmp_path)
    proc = cli("switch", t, a, tmp_path, alt2, check=False)
    one_line_error(proc, f"image {alt2} has the same content as a deployment")
    assert snapshot(t, tmp_path)[1:] == before[1:] and staged_id(tmp_path) == b


# --- soft reboot: /run/nextroot as the initramfs mounts a deployment ---


def test_soft_reboot_prepares_nextroot(
    target: Target,
    upd_images: dict[str, BootImage],
    registry: Registry,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    t, imgs = target, upd_images
    ref, a = install_v1(t, imgs, registry, request)
    retag(imgs["v2"], ref)
    nextroot = tmp_path / "nextroot"
    try:
        out = cli("upgrade", t, a, tmp_path, "--soft-reboot", "required", "--nextroot", nextroot).stdout
        b = staged_id(tmp_path)
        assert f"Soft reboot prepared: {nextroot}\n" in out
        assert slot(doc(t, a, tmp_path), "staged")["softRebootCapable"] is True
        table = {point: (fstype, source) for point, fstype, source in mounts()}
        assert table[str(nextroot)] == ("overlay", f"composefs:{b}")
        state = t.root / "state/deploy" / b
        for inside, outside in (("etc", state / "etc"), ("var", t.root / "state/os/default/var")):
            got, want = os.stat(nextroot / inside), os.stat(outside)
            assert (got.st_dev, got.st_ino) == (want.st_dev, want.st_ino), inside
        assert os.statvfs(nextroot / "sysroot").f_flag & os.ST_RDONLY
        assert sorted(os.listdir(nextroot / "sysroot")) == sorted(os.listdir(t.root))
        assert (nextroot / "usr/share/v2-only").read_bytes() == blob("v2-only", 70_000)
        assert (nextroot / "etc/hostname").read_bytes() == b"bootc-test\n"
    finally:
        subprocess.run(["umount", "-R", "-l", str(nextroot)], capture_output=True)


def test_install_pulls_bound_images(
    target: Target,
    upd_images: dict[str, BootImage],
    registry: Registry,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    """Install puts the image's bound images into the bootc store (bootc's composefs install does
    not); one that cannot be pulled installs nothing."""
    t, imgs = target, upd_images
    ref = repo_for(registry, request)
    retag(imgs["v2bad"], ref)
    proc = install(t, "--allow-missing-verity", "--source-imgref", f"docker://{ref}", check=False)
    one_line_error(proc, f"bound image {registry.address}/upd/no-such-app:latest", f"/{BOUND}/app.image")
    assert listing(t.root) == [] and listing(t.esp) == []

    retag(imgs["v2app"], ref)
    out = install(t, "--allow-missing-verity", "--source-imgref", f"docker://{ref}").stdout
    assert f"bound image {imgs['app'].ref}: pulled" in out
    pm = podman_on(t.store, tmp_path / "podman")
    found = json.loads(pm("image", "inspect", imgs["app"].ref))
    assert found[0]["Digest"] == imgs["app"].digest  # podman's own view of the store
