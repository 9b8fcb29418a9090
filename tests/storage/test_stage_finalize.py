"""Stage, finalize and rollback on real deployments: `install to-filesystem` of small bootable
images (built with buildah, pushed to the local registry) onto loop btrfs/XFS/ext4, a second image
pulled into the bootc store with `image pull` and imported with `internals cfs import`, then
stage.py, the hidden `internals finalize-staged` and `rollback` on the result.

Oracles: the bytes written into the images (kernel, initramfs, /etc files, kargs.d), the
registry's manifest digest, the entry files read back as text and compared to the booted entry
edited by hand, and status.build()'s document. The live /etc is the booted deployment's
state/deploy/<id>/etc (what the initramfs binds on /etc); the ESP is a directory on the loop fs
(the host cannot mount vfat).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootc_unified.deploy import status
from bootc_unified.deploy.origin import Origin
from bootc_unified.deploy.spec import ImageReference
from bootc_unified.deploy.stage import stage
from bootc_unified.deploy.staged import StagedMarker
from bootc_unified.deploy.sysroot import Esp, Sysroot
from bootc_unified.errors import UserError
from harness.loopfs import LoopFs
from harness.pytest_plugin import require
from harness.registry import Registry
from harness.run import run
from harness.testimages import Buildah, push
from harness.testimages import missing_prerequisites as images_missing
from testsupport.bootimages import KVER, blob
from testsupport.plugin import run_cli

pytestmark = pytest.mark.storage

KERNEL, KERNEL_C, INITRAMFS = blob("vmlinuz", 300_000), blob("vmlinuz-c", 300_000), blob("initramfs", 120_000)


def files(version: str, kernel: bytes, etc: dict[str, bytes], kargs: str) -> dict[str, bytes]:
    os_release = (
        f'NAME="Bootc Test"\nID=bootc-test\nVERSION_ID={version}\nPRETTY_NAME="Bootc Test {version}"\n'
    )
    return {
        "usr/lib/os-release": os_release.encode(),
        "usr/lib/bootc/kargs.d/10-test.toml": f"kargs = [{kargs}]\n".encode(),
        f"usr/lib/modules/{KVER}/vmlinuz": kernel,
        f"usr/lib/modules/{KVER}/initramfs.img": INITRAMFS,
        "usr/share/data": blob("data" + version, 50_000),
        "etc/.updated": b"",
        **{f"etc/{k}": v for k, v in etc.items()},
    }


def etc_files(tag: str) -> dict[str, bytes]:
    return {
        "hostname": b"bootc-test\n",
        "defaults.conf": f"{tag}-default\n".encode(),
        "local.conf": f"{tag}-local\n".encode(),
        "removed.conf": b"removed locally\n",
        "sub/dir/file": b"in a directory\n",
    }


IMAGES: dict[str, dict[str, bytes]] = {
    "stage-a": files("1.0", KERNEL, etc_files("a"), '"console=ttyS0", "quiet"'),
    "stage-b": files("2.0", KERNEL, etc_files("b"), '"console=ttyS0", "b.flag=1"'),
    "stage-c": files("3.0", KERNEL_C, etc_files("c"), '"console=ttyS0", "b.flag=1"'),
    # etc/sub/dir is a file here: unmergeable with a local change to the directory
    "stage-d": files(
        "4.0", KERNEL, {**etc_files("d"), "sub/dir": b"a file now\n"}, '"console=ttyS0", "quiet"'
    ),
}
del IMAGES["stage-d"]["etc/sub/dir/file"]


@dataclass(frozen=True)
class Img:
    ref: str
    digest: str  # the registry's manifest digest


@pytest.fixture(scope="session")
def stage_images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Img]:
    require(images_missing(), "building bootable test images")
    b = Buildah(tmp_path_factory.mktemp("stageimages"))
    out = {}
    try:
        for name, content in IMAGES.items():
            container = b("from", "--pull-never", "scratch")
            root = Path(b("mount", container))
            for rel, data in content.items():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(data)
            (root / "var/lib").mkdir(parents=True)
            b("config", "--arch", "amd64", "--os", "linux", container)
            b("commit", "--quiet", "--rm", "--timestamp", "1700000000", container, f"localhost/{name}:latest")
            ref, digest = push(b, name, registry.address, "gzip")
            out[name] = Img(ref, digest)
    finally:
        b.close()
    return out


@dataclass
class Target:
    root: Path
    esp: Path
    work: Path

    @property
    def sysroot(self) -> Sysroot:
        return Sysroot(self.root)

    @property
    def marker(self) -> Path:
        return self.work / "staged-deployment"

    @property
    def entries(self) -> Path:
        return self.esp / "loader/entries"

    @property
    def staged_entries(self) -> Path:
        return self.esp / "loader/entries.staged"

    def etc(self, depl_id: str) -> Path:
        return self.root / "state/deploy" / depl_id / "etc"

    def install(self, img: Img) -> str:
        before = (
            set(os.listdir(self.root / "state/deploy")) if (self.root / "state/deploy").exists() else set()
        )
        run_cli(
            "install", "to-filesystem", self.root, "--boot-esp", self.esp, "--tls-verify", "false",
            "--allow-missing-verity", "--source-imgref", f"docker://{img.ref}",
        )  # fmt: skip
        (new,) = set(os.listdir(self.root / "state/deploy")) - before
        return new

    def import_image(self, img: Img) -> tuple[str, Origin]:
        """Pull into the bootc store, import into the repository; (EROFS id, origin)."""
        store_id = run_cli(
            "image", "pull", "--sysroot", self.root, "--tls-verify", "false", f"docker://{img.ref}"
        ).stdout.split()[-1]
        out = run_cli(
            "internals", "cfs", "--repo", self.root / "composefs", "import",
            "--storage", self.root / "ostree/bootc/storage", store_id,
        ).stdout  # fmt: skip
        doc = json.loads(out)
        assert doc["manifest_digest"] == img.digest
        return str(doc["image_id"]), Origin.new(ImageReference(img.ref, "registry"), None, img.digest)

    def mountinfo(self, booted: str) -> Path:
        path = self.work / f"mountinfo-{booted[:8]}"
        path.write_text(
            f"36 1 0:40 / / ro,relatime shared:1 - overlay composefs:{booted} ro,lowerdir+=/x\n"
            "40 36 7:0 / /sysroot ro,relatime shared:2 - ext4 /dev/vda2 ro\n"
        )
        return path

    def cli(
        self, booted: str, *args: str | Path, check: bool = True, sysroot: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`rollback` or `internals finalize-staged` as booted from `booted`."""
        extra: list[str | Path] = ["--esp", self.esp, "--mountinfo", self.mountinfo(booted)]
        extra += ["--staged-marker", self.marker, "--sysroot", sysroot or self.root]
        if args[0] == "internals":
            extra += ["--etc", self.etc(booted)]
        return run_cli(*args, *extra, check=check)

    def status(self, booted: str) -> dict[str, object]:
        report = status.build(self.sysroot, Esp(self.esp), booted, StagedMarker.read(self.marker))
        doc: dict[str, object] = json.loads(status.render_json(report.host))
        return doc

    def order(self) -> list[tuple[str, str, str]]:
        """(file name, sort-key, composefs id) of loader/entries in boot-menu order."""
        from bootc_unified.deploy import bls

        return [
            (ef.path.name, ef.entry.sort_key or "", ef.entry.composefs.digest if ef.entry.composefs else "")
            for ef in bls.read_entries(self.entries)
        ]


@pytest.fixture
def target(loopfs: LoopFs, tmp_path: Path) -> Iterator[Target]:
    root, esp = loopfs.path / "root", loopfs.path / "esp"
    root.mkdir()
    esp.mkdir()
    yield Target(root, esp, tmp_path)
    subprocess.run(["umount", "-R", str(root / "ostree/bootc/storage/overlay")], capture_output=True)


def entry_text(path: Path) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in path.read_text().splitlines())


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


def st(doc: dict[str, object]) -> dict[str, object]:
    value = doc["status"]
    assert isinstance(value, dict)
    return value


def verity_of(slot: object) -> str | None:
    return slot["composefs"]["verity"] if isinstance(slot, dict) else None


# --- stage and finalize ------------------------------------------------------------------------------


def test_stage_finalize_then_rollback_two_entries(target: Target, stage_images: dict[str, Img]) -> None:
    t = target
    a = t.install(stage_images["stage-a"])
    (booted_name,) = listing(t.entries)
    booted_entry = (t.entries / booted_name).read_text()
    # local changes in the live /etc
    (t.etc(a) / "local.conf").write_text("mine\n")
    (t.etc(a) / "added.conf").write_text("added locally\n")
    (t.etc(a) / "removed.conf").unlink()
    b, origin = t.import_image(stage_images["stage-b"])

    res = stage(t.sysroot, Esp(t.esp), a, b, origin, current_etc=t.etc(a), marker=t.marker)

    # The booted entry stays the only (default) one until finalize.
    assert listing(t.entries) == [booted_name] and (t.entries / booted_name).read_text() == booted_entry
    assert listing(t.staged_entries) == ["bootc_bootc_test-1.0-0.conf", "bootc_bootc_test-2.0-1.conf"]
    old = entry_text(t.entries / booted_name)
    new = entry_text(t.staged_entries / "bootc_bootc_test-2.0-1.conf")
    # options: the booted ones with composefs= replaced, kargs.d diff (-quiet, +b.flag=1)
    expected = (
        old["options"].replace(f"composefs=?{a}", f"composefs=?{b}").replace(" quiet", "") + " b.flag=1"
    )
    assert new["options"] == expected == res.options
    assert (
        new["title"] == "Bootc Test 2.0"
        and new["version"] == "2.0"
        and new["sort-key"] == "bootc-bootc-test-0"
    )
    # kernel bytes equal: the booted kernel dir is shared
    assert new["linux"] == f"/EFI/Linux/bootc_composefs-{a}/vmlinuz" and res.kernel_shared
    assert listing(t.esp / "EFI/Linux") == [f"bootc_composefs-{a}"]
    secondary = (t.staged_entries / "bootc_bootc_test-1.0-0.conf").read_text()
    assert secondary == booted_entry.replace("sort-key bootc-bootc-test-0\n", "sort-key bootc-bootc-test-1\n")
    # state dir: the new image's /etc, var link, origin
    state = t.root / "state/deploy" / b
    assert (state / "etc/defaults.conf").read_bytes() == b"b-default\n"
    assert (state / "etc/local.conf").read_bytes() == b"b-local\n" and not (state / "etc/.updated").exists()
    assert os.readlink(state / "var") == "../../os/default/var"
    origin_text = (state / f"{b}.origin").read_text()
    assert f"digest = {hashlib.sha256(KERNEL + INITRAMFS).hexdigest()}\n" in origin_text
    assert f"manifest_digest = {stage_images['stage-b'].digest}\n" in origin_text
    assert t.marker.read_text() == f'{{"depl_id":"{b}","finalization_locked":false}}'
    doc = t.status(a)
    assert verity_of(st(doc)["staged"]) == b and verity_of(st(doc)["booted"]) == a
    assert st(doc)["rollback"] is None and st(doc)["rollbackQueued"] is False
    # the dry run: etc/.updated is never in a state dir, so it always counts as removed
    assert res.merge.added == ["added.conf"] and res.merge.modified == ["local.conf"]
    assert res.merge.removed == [".updated", "removed.conf"]

    staged_bytes = {n: (t.staged_entries / n).read_bytes() for n in listing(t.staged_entries)}
    # As on a booted system, /sysroot is a read-only bind of the physical root: finalize makes it
    # writable in its own mount namespace only.
    ro = t.work / "sysroot"
    ro.mkdir()
    run(["mount", "--bind", str(t.root), str(ro)])
    try:
        run(["mount", "-o", "remount,bind,ro", str(ro)])
        assert os.statvfs(ro).f_flag & os.ST_RDONLY
        out = t.cli(a, "internals", "finalize-staged", sysroot=ro).stdout
        assert os.statvfs(ro).f_flag & os.ST_RDONLY  # still read-only out here
    finally:
        run(["umount", str(ro)])
    assert out == (
        f"Finalized deployment {b}: /etc merge kept 1 added, 1 modified, 2 removed\n"
        "GC: removed 0 deployments, 0 kernel dirs\n"  # a and b stay in the menu
    )
    assert {n: (t.entries / n).read_bytes() for n in listing(t.entries)} == staged_bytes
    assert not t.staged_entries.exists() and not t.marker.exists()
    assert (state / "etc/local.conf").read_bytes() == b"mine\n"  # local change wins
    assert (state / "etc/added.conf").read_bytes() == b"added locally\n"
    assert not (state / "etc/removed.conf").exists()
    assert (state / "etc/defaults.conf").read_bytes() == b"b-default\n"  # untouched: new default
    assert (t.etc(a) / "local.conf").read_bytes() == b"mine\n"  # the old deployment's etc unchanged
    # Still on a until the reboot: the next boot leaves it.
    doc = t.status(a)
    assert st(doc)["rollbackQueued"] is True and verity_of(st(doc)["rollback"]) == b
    assert t.cli(a, "internals", "finalize-staged").stdout == "No staged deployment\n"

    # Rebooted into b: a is the rollback. Rollback with two entries, then again (reverts).
    doc = t.status(b)
    assert verity_of(st(doc)["booted"]) == b and verity_of(st(doc)["rollback"]) == a
    assert st(doc)["rollbackQueued"] is False
    assert t.cli(b, "rollback").stdout == f"Next boot: deployment {a}\n"
    assert t.order() == [
        ("bootc_bootc_test-1.0-1.conf", "bootc-bootc-0", a),
        ("bootc_bootc_test-2.0-0.conf", "bootc-bootc-1", b),
    ]
    doc = t.status(b)
    assert st(doc)["rollbackQueued"] is True and doc["spec"]["bootOrder"] == "rollback"  # type: ignore[index]
    assert verity_of(st(doc)["rollback"]) == a and not t.staged_entries.exists()
    out = t.cli(b, "rollback").stdout
    assert out == f"Reverting queued rollback state\nNext boot: deployment {b}\n"
    assert [x[2] for x in t.order()] == [b, a] and t.status(b)["status"]["rollbackQueued"] is False  # type: ignore[index]


def test_download_only_and_unmergeable_etc(target: Target, stage_images: dict[str, Img]) -> None:
    t = target
    a = t.install(stage_images["stage-a"])
    proc = t.cli(a, "rollback", check=False)  # one entry: nothing to roll back to
    assert (proc.returncode, proc.stderr) == (1, "bootc-unified: error: No rollback available\n")
    b, origin_b = t.import_image(stage_images["stage-b"])
    stage(t.sysroot, Esp(t.esp), a, b, origin_b, current_etc=t.etc(a), marker=t.marker, download_only=True)
    assert t.marker.read_text() == f'{{"depl_id":"{b}","finalization_locked":true}}'
    assert t.status(a)["status"]["staged"]["downloadOnly"] is True  # type: ignore[index]
    entries = {n: (t.entries / n).read_bytes() for n in listing(t.entries)}
    staged = {n: (t.staged_entries / n).read_bytes() for n in listing(t.staged_entries)}
    out = t.cli(a, "internals", "finalize-staged").stdout
    assert out == f"Staged deployment {b} is download-only; not finalizing\n"
    assert {n: (t.entries / n).read_bytes() for n in listing(t.entries)} == entries
    assert t.marker.exists() and len(staged) == 2

    # A local change to etc/sub/dir (a directory) against an image where it is a file: refused
    # with one line before anything is written; the download-only staging stays as it was.
    os.chmod(t.etc(a) / "sub/dir", 0o700)
    d, origin_d = t.import_image(stage_images["stage-d"])
    deploy_before = listing(t.root / "state/deploy")
    with pytest.raises(UserError) as e:
        stage(t.sysroot, Esp(t.esp), a, d, origin_d, current_etc=t.etc(a), marker=t.marker)
    assert str(e.value) == (
        "Merge conflicts found in etc: /etc/sub/dir is a directory locally "
        "and not a directory in the new image"
    )
    assert listing(t.root / "state/deploy") == deploy_before and d not in deploy_before
    assert {n: (t.staged_entries / n).read_bytes() for n in listing(t.staged_entries)} == staged
    assert StagedMarker.read(t.marker) == StagedMarker(b, True)
    assert listing(t.esp / "EFI/Linux") == [f"bootc_composefs-{a}"]
    assert not list((t.esp / "loader").glob(".entries*")) and not list((t.root / "state/deploy").glob(".*"))
    # Already in the boot menu: refused too.
    with pytest.raises(UserError, match="already in the boot menu"):
        stage(t.sysroot, Esp(t.esp), a, a, origin_b, current_etc=t.etc(a), marker=t.marker)


# --- rollback with three entries ---------------------------------------------------------------------


def test_rollback_three_entries_drops_staged(target: Target, stage_images: dict[str, Img]) -> None:
    t = target
    a = t.install(stage_images["stage-a"])
    b = t.install(stage_images["stage-b"])
    c = t.install(stage_images["stage-c"])  # another kernel: its own kernel dir
    assert [x[2] for x in t.order()] == [c, b, a]  # one sort-key, version descending
    d, origin_d = t.import_image(stage_images["stage-d"])
    res = stage(t.sysroot, Esp(t.esp), c, d, origin_d, current_etc=t.etc(c), marker=t.marker)
    assert res.kernel_shared and res.kernel_dir.name == f"bootc_composefs-{a}"  # d's kernel = a's
    assert listing(t.esp / "EFI/Linux") == sorted([f"bootc_composefs-{a}", f"bootc_composefs-{c}"])
    assert verity_of(t.status(c)["status"]["staged"]) == d  # type: ignore[index]

    out = t.cli(c, "rollback").stdout
    assert out == f"Dropped staged deployment {d}\nNext boot: deployment {b}\n"
    assert not t.staged_entries.exists() and not t.marker.exists()
    assert t.order() == [
        ("bootc_bootc_test-2.0-2.conf", "bootc-bootc-0", b),
        ("bootc_bootc_test-3.0-1.conf", "bootc-bootc-1", c),
        ("bootc_bootc_test-1.0-0.conf", "bootc-bootc-2", a),
    ]
    doc = t.status(c)
    assert st(doc)["staged"] is None and verity_of(st(doc)["booted"]) == c
    assert verity_of(st(doc)["rollback"]) == b
    assert [verity_of(x) for x in st(doc)["otherDeployments"]] == [a]  # type: ignore[attr-defined]
    assert st(doc)["rollbackQueued"] is True and doc["spec"]["bootOrder"] == "rollback"  # type: ignore[index]

    # Rolled back again: re-swapped, c the default; the others keep their order.
    assert t.cli(c, "rollback").stdout == f"Reverting queued rollback state\nNext boot: deployment {c}\n"
    assert [x[2] for x in t.order()] == [c, b, a] and t.status(c)["status"]["rollbackQueued"] is False  # type: ignore[index]
    # Booted into a by hand from the menu: a rollback makes a the default.
    assert t.cli(a, "rollback").stdout == f"Reverting queued rollback state\nNext boot: deployment {a}\n"
    assert [x[2] for x in t.order()] == [a, c, b]


def test_finalize_drops_what_left_the_menu(target: Target, stage_images: dict[str, Img]) -> None:
    """Finalize swaps in [d, c]: a and b leave the menu, and the GC after finalize removes their
    state dirs (a's kernel dir stays: d shares it); the stores are left for the next upgrade."""
    t = target
    a = t.install(stage_images["stage-a"])
    b = t.install(stage_images["stage-b"])
    c = t.install(stage_images["stage-c"])
    d, origin_d = t.import_image(stage_images["stage-d"])
    stage(t.sysroot, Esp(t.esp), c, d, origin_d, current_etc=t.etc(c), marker=t.marker)
    objects_before = sorted(p.name for p in (t.root / "composefs/objects").rglob("*"))
    out = t.cli(c, "internals", "finalize-staged").stdout.splitlines()
    assert out[1] == "GC: removed 2 deployments, 0 kernel dirs"
    assert sorted(listing(t.root / "state/deploy")) == sorted([c, d])  # a and b gone
    assert a not in listing(t.root / "state/deploy") and b not in listing(t.root / "state/deploy")
    assert {x[2] for x in t.order()} == {c, d}
    assert listing(t.esp / "EFI/Linux") == sorted([f"bootc_composefs-{a}", f"bootc_composefs-{c}"])
    assert sorted(p.name for p in (t.root / "composefs/objects").rglob("*")) == objects_before
