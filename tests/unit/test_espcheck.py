"""`internals fsck-esp` (deploy/espcheck.py) on a real FAT32 image (mkfs.vfat, mtools), damaged
as a power cut leaves an ESP: `loader/entries.staged`'s cluster never written (harness.tamper_guest
--fat-dir). The oracle is fsck.fat itself in read-only mode (`-n`) before and after."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bootc_unified.deploy.espcheck import fsck_esp
from bootc_unified.errors import UserError
from harness.tamper_guest import zero_fat_dir

ENTRY = "title a\nlinux /a/vmlinuz\n"


def esp_image(tmp_path: Path) -> str:
    image = tmp_path / "esp.img"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.vfat", "-F", "32", str(image)], check=True, capture_output=True)
    for d in ("loader", "loader/entries", "loader/entries.staged"):
        subprocess.run(["mmd", "-i", str(image), f"::{d}"], check=True)
    conf = tmp_path / "a.conf"
    conf.write_text(ENTRY)
    for d in ("loader/entries", "loader/entries.staged"):
        subprocess.run(["mcopy", "-i", str(image), str(conf), f"::{d}/a.conf"], check=True)
    return str(image)


def read_only_check(image: str) -> int:
    return subprocess.run(["fsck.fat", "-n", image], capture_output=True).returncode


def test_a_clean_esp_is_left_alone(tmp_path: Path) -> None:
    image = esp_image(tmp_path)
    before = Path(image).read_bytes()
    assert fsck_esp(device=image) == f"ESP {image}: clean"
    assert Path(image).read_bytes() == before


def test_a_directory_a_power_cut_left_unwritten_is_repaired(tmp_path: Path) -> None:
    """The damage the VM scenarios met: the staged entries directory named in `loader/`, its
    cluster and FAT entry never written. fsck.fat -a needs three passes (its '.' entries, then
    its start, then the orphaned long name); the directory goes, the rest of the ESP stays."""
    image = esp_image(tmp_path)
    damage = zero_fat_dir(image, "loader/entries.staged")
    assert read_only_check(image) == 1  # fsck.fat sees the damage
    said = fsck_esp(device=image)
    assert said.startswith(f"ESP {image}: repaired by fsck.fat -a: ") and "entries.staged" in said, said
    assert "\n" not in said
    assert read_only_check(image) == 0, (damage, said)
    kept = subprocess.run(["mtype", "-i", image, "::loader/entries/a.conf"], check=True, capture_output=True)
    assert kept.stdout.decode() == ENTRY
    assert fsck_esp(device=image) == f"ESP {image}: clean"


def test_not_a_fat_filesystem_is_one_line_naming_it(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(bytes(1 << 20))
    with pytest.raises(UserError) as e:
        fsck_esp(device=str(junk))
    assert str(junk) in str(e.value) and "fsck.fat -a failed" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("booted", [True, False])
def test_a_verb_waits_for_the_boots_check_before_it_mounts_the_esp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, booted: bool
) -> None:
    """wait_for_esp_check: `systemctl start` of the check unit (waits for a running oneshot, no-op
    after it ran) on a systemd-booted system, nothing elsewhere. This host runs no systemd, so a
    stand-in `systemctl` on PATH (a test double) records what it was asked; the VM tier's tamper and
    power-cut scenarios prove the wait on a real boot."""
    from bootc_unified.deploy.sysroot import ESP_CHECK_UNIT, wait_for_esp_check

    bin_dir, log = tmp_path / "bin", tmp_path / "systemctl.log"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    run = tmp_path / "run-systemd-system"
    if booted:
        run.mkdir()
    wait_for_esp_check(run)
    assert (log.read_text() if log.exists() else "") == (f"start {ESP_CHECK_UNIT}\n" if booted else "")
    assert (Path(__file__).parents[2] / "bootc_unified/boot/units" / ESP_CHECK_UNIT).is_file()
