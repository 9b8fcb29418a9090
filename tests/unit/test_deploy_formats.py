"""The deployment's small file formats: kernel command line, BLS entries, .origin, os-release,
kargs.d, mountinfo, the staged marker; each against bytes written out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootc_unified.boot.cmdline import (
    ComposefsArg,
    join_cmdline,
    parse_composefs,
    replace_composefs,
    split_cmdline,
)
from bootc_unified.deploy import bls, kargs, sysroot
from bootc_unified.deploy.origin import Origin, parse_imgref
from bootc_unified.deploy.osrelease import OsRelease
from bootc_unified.deploy.spec import ImageReference
from bootc_unified.deploy.staged import StagedMarker
from bootc_unified.errors import UserError

ID = "0123456789abcdef" * 8


def test_cmdline_split_join() -> None:
    line = 'root=UUID=x rw  quiet foo="a b" composefs=?' + ID + "\n"
    args = split_cmdline(line)
    assert args == ["root=UUID=x", "rw", "quiet", 'foo="a b"', "composefs=?" + ID]
    assert split_cmdline(join_cmdline(args)) == args
    assert join_cmdline(["a=b c", "d e"]) == 'a="b c" "d e"'


def test_composefs_arg() -> None:
    assert parse_composefs(f"rw composefs={ID}") == ComposefsArg(ID, insecure=False)
    assert parse_composefs(f"rw composefs=?{ID}") == ComposefsArg(ID, insecure=True)
    assert parse_composefs("rw quiet") is None
    assert str(ComposefsArg(ID, True)) == f"composefs=?{ID}"
    with pytest.raises(UserError, match="not a sha256/sha512 hex digest"):
        parse_composefs("composefs=xyz")
    new = ComposefsArg("f" * 128)
    assert replace_composefs(["a", f"composefs={ID}", "b"], new) == ["a", str(new), "b"]
    assert replace_composefs(["a"], new) == ["a", str(new)]


ENTRY = (
    "title Bootc Test 1.0\n"
    "version 1.0\n"
    f"linux /EFI/Linux/bootc_composefs-{ID}/vmlinuz\n"
    f"initrd /EFI/Linux/bootc_composefs-{ID}/initrd\n"
    f"options root=UUID=u rw composefs=?{ID}\n"
    "sort-key bootc-bootc-test-0\n"
)


def test_bls_round_trip() -> None:
    entry = bls.BlsEntry.parse(ENTRY)
    assert entry.render() == ENTRY
    assert entry.composefs == ComposefsArg(ID, True)
    assert entry.kernel_dir_name == f"bootc_composefs-{ID}"
    assert bls.file_name("bootc-test", "1.0", bls.PRIMARY) == "bootc_bootc_test-1.0-1.conf"
    assert bls.sort_key("bootc-test", primary=False) == "bootc-bootc-test-1"


def test_bls_menu_order(tmp_path: Path) -> None:
    def write(name: str, key: str | None, version: str) -> None:
        text = f"title t\nversion {version}\n" + (f"sort-key {key}\n" if key else "")
        (tmp_path / name).write_text(text)

    write("z-nokey.conf", None, "9")
    write("b.conf", "bootc-os-1", "5")
    write("a-old.conf", "bootc-os-0", "1.9")
    write("a-new.conf", "bootc-os-0", "1.10")  # version compares numerically: 1.10 > 1.9
    (tmp_path / "README").write_text("not an entry")
    names = [e.path.name for e in bls.read_entries(tmp_path)]
    assert names == ["a-new.conf", "a-old.conf", "b.conf", "z-nokey.conf"]


def test_kernel_dir_shared_by_digest(tmp_path: Path) -> None:
    esp = sysroot.Esp(tmp_path / "esp")
    k, i = tmp_path / "k", tmp_path / "i"
    k.write_bytes(b"kernel" * 1000)
    i.write_bytes(b"initrd" * 1000)
    first = bls.install_kernel(esp, "a" * 128, k, i)
    assert first.created and not first.shared and first.path.name == "bootc_composefs-" + "a" * 128
    import hashlib

    assert first.digest == hashlib.sha256(k.read_bytes() + i.read_bytes()).hexdigest()
    second = bls.install_kernel(esp, "b" * 128, k, i)
    assert second.path == first.path and second.shared and not second.created
    i.write_bytes(b"other")
    third = bls.install_kernel(esp, "c" * 128, k, i)
    assert third.created and (third.path / "initrd").read_bytes() == b"other"
    assert sorted(p.name for p in esp.linux.iterdir()) == [first.path.name, third.path.name]


ORIGIN = (
    "[origin]\n"
    "container-image-reference = ostree-unverified-image:docker://quay.io/example/os:latest\n"
    "\n"
    "[boot]\n"
    "boot_type = bls\n"
    f"digest = {'d' * 64}\n"
    "\n"
    "[image]\n"
    f"manifest_digest = sha256:{'1' * 64}\n"
)


def test_origin(tmp_path: Path) -> None:
    ref = ImageReference("quay.io/example/os:latest", "registry")
    origin = Origin.new(ref, "d" * 64, "sha256:" + "1" * 64)
    assert origin.render() == ORIGIN
    assert Origin.parse(ORIGIN, "x") == origin and origin.imgref == ref
    path = tmp_path / "x.origin"
    origin.write(path)
    assert path.read_text() == ORIGIN and path.stat().st_mode & 0o777 == 0o644
    assert Origin.read(path) == origin
    assert parse_imgref("containers-storage:localhost/os") == ImageReference(
        "localhost/os", "containers-storage"
    )
    assert parse_imgref("oci:/var/tmp/os") == ImageReference("/var/tmp/os", "oci")
    with pytest.raises(UserError, match=r"x.origin: no manifest_digest in \[image\]"):
        Origin.parse(ORIGIN.split("[image]")[0], "x.origin")
    with pytest.raises(UserError, match="origin file is missing"):
        Origin.read(tmp_path / "none.origin")
    with pytest.raises(UserError, match="ftp://x"):
        parse_imgref("ftp://x")


def test_os_release(tmp_path: Path) -> None:
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/os-release").write_text(
        'ID=debian\nVERSION_ID="13"\nPRETTY_NAME="Debian GNU/Linux 13"\n'
    )
    rel = OsRelease.from_root(tmp_path)
    assert (rel.os_id, rel.title("x"), rel.version("x")) == ("debian", "Debian GNU/Linux 13", "13")
    (tmp_path / "usr/lib/os-release").write_text("NAME=Thing\nVERSION='2 (two)'\n")
    rel = OsRelease.from_root(tmp_path)
    assert (rel.os_id, rel.title("x"), rel.version("x")) == ("bootc", "Thing", "2 (two)")
    empty = OsRelease.from_root(tmp_path / "nothing")
    assert (empty.os_id, empty.title(ID), empty.version(ID)) == ("bootc", ID, ID)


def test_kargs_d(tmp_path: Path) -> None:
    d = tmp_path / kargs.KARGS_D
    d.mkdir(parents=True)
    (d / "20-b.toml").write_text('kargs = ["b=2"]\n')
    (d / "10-a.toml").write_text('kargs = ["a=1", "quiet"]\nmatch-architectures = ["x86_64", "aarch64"]\n')
    (d / "30-s390.toml").write_text('kargs = ["never"]\nmatch-architectures = ["s390x"]\n')
    (d / "ignored.txt").write_text("kargs = 1")
    assert kargs.from_root(tmp_path, "x86_64") == ["a=1", "quiet", "b=2"]
    assert kargs.from_root(tmp_path, "s390x") == ["b=2", "never"]
    for text, message in [
        ("kargs = [1]\n", "must be a list of strings"),
        ('karg = ["x"]\n', "unknown key 'karg'"),
        ("match-architectures = []\n", "must be a list of strings"),
        ("kargs = [\n", "not valid TOML"),
    ]:
        (d / "40-bad.toml").write_text(text)
        with pytest.raises(UserError, match=message) as e:
            kargs.from_root(tmp_path, "x86_64")
        assert "40-bad.toml" in str(e.value) and "\n" not in str(e.value)
    (d / "40-bad.toml").unlink()
    (d / "50-dir.toml").mkdir()
    with pytest.raises(UserError, match=r"50-dir\.toml: cannot read"):
        kargs.from_root(tmp_path, "x86_64")


def test_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "20 1 8:2 / / rw - ext4 /dev/sda2 rw\n"
        f"36 20 0:40 / / ro shared:1 - overlay composefs:{ID} ro\n"
        "41 36 8:1 / /boot/efi rw - vfat /dev/sda1 rw\n"
        "42 36 0:50 / /mnt/with\\040space rw - tmpfs none rw\n"
    )
    assert sysroot.booted_id(info) == ID
    assert sysroot.find_esp(info) == Path("/boot/efi")
    assert ("/mnt/with space", "tmpfs", "none") in sysroot.mounts(info)
    info.write_text("20 1 8:2 / / rw - ext4 /dev/sda2 rw\n")
    assert sysroot.booted_id(info) is None and sysroot.find_esp(info) is None
    info.write_text(f"20 1 0:1 / / rw - overlay transient:composefs={ID} rw\n")
    assert sysroot.booted_id(info) == ID
    info.write_text("garbage\n")
    with pytest.raises(UserError, match="not a mountinfo line"):
        sysroot.booted_id(info)


def test_staged_marker(tmp_path: Path) -> None:
    path = tmp_path / "staged-deployment"
    assert StagedMarker.read(path) is None
    path.write_text(f'{{"depl_id":"{ID}","finalization_locked":true}}')
    assert StagedMarker.read(path) == StagedMarker(ID, True)
    StagedMarker(ID).write(path)
    assert path.read_text() == f'{{"depl_id":"{ID}","finalization_locked":false}}'
    path.write_text("{}")
    with pytest.raises(UserError, match="not a staged-deployment marker"):
        StagedMarker.read(path)
