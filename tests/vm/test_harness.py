"""Fast checks of the VM harness's pure parts: console scanning, domain XML, QEMU command line."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from harness.pytest_plugin import require
from harness.vm import console
from harness.vm.accel import ENV, TCG, TCG_SCALE, Accel, detect
from harness.vm.domain import DomainConfig
from harness.vm.firmware import Firmware
from harness.vm.firmware import missing_prerequisites as firmware_missing
from harness.vm.qemu import qemu_argv
from harness.vm.spec import MachineSpec

CLEAN = """\
[    0.000000] Linux version 6.12.117+deb13-amd64
[  OK  ] Reached target multi-user.target - Multi-User System.
bootc-guest login:
"""


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ("[    5.1] Kernel panic - not syncing: VFS: Unable to mount root fs", "kernel panic"),
        ("[    7.2] Oops: general protection fault, probably for non-canonical address", "kernel Oops"),
        ("[    7.3] BUG: kernel NULL pointer dereference, address: 0000000000000008", "kernel BUG"),
        ("[    7.4] kernel BUG at fs/btrfs/inode.c:1234!", "kernel BUG"),
        ('You are in emergency mode. After logging in, type "journalctl -xb"', "emergency shell"),
        ("\x1b[0;32m  OK  \x1b[0m] Reached target emergency.target - Emergency Mode.", "emergency shell"),
        ('You are in rescue mode. After logging in, type "journalctl -xb"', "rescue shell"),
        ("(initramfs) ", "initramfs shell"),
    ],
)
def test_console_trouble_is_named_with_its_line(tmp_path: Path, line: str, what: str) -> None:
    log = tmp_path / "console.log"
    log.write_text(CLEAN + line + "\n")
    with pytest.raises(console.ConsoleError) as info:
        console.check(log)
    finding = info.value.findings[0]
    assert (finding.what, finding.line_number) == (what, 4)
    assert "console line 4" in str(info.value)


def test_clean_console_passes(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text(CLEAN)
    console.check(log)
    assert console.scan(CLEAN) == []


def spec(tmp_path: Path) -> MachineSpec:
    return MachineSpec(
        name="bootc-unified-test",
        disk=tmp_path / "disk.qcow2",
        workdir=tmp_path / "vm",
        accel=Accel(TCG, 10.0, "test"),
        firmware=Firmware(Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),
        ssh_port=2222,
        ssh_key=tmp_path / "id",
    )


def test_domain_xml_is_valid_libvirt(tmp_path: Path) -> None:
    xml = DomainConfig.from_spec(spec(tmp_path)).to_xml()
    for needle in (
        "<domain xmlns:qemu=",
        'type="qemu"',
        "<on_reboot>destroy</on_reboot>",
        'type="pflash"',
        "hostfwd=tcp:127.0.0.1:2222-:22",
        'append="on"',
    ):
        assert needle in xml
    tools = {"virt-xml-validate": "libvirt-clients", "xmllint": "libxml2-utils"}
    require(
        [f"{t} (Debian package {p})" for t, p in tools.items() if shutil.which(t) is None], "XML validation"
    )
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    proc = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_qemu_argv(tmp_path: Path) -> None:
    argv = qemu_argv(spec(tmp_path))
    assert "-no-reboot" in argv
    assert "tcg,tb-size=256" in argv
    assert "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22" in argv
    assert any(a.startswith("file,id=serial0,") and a.endswith("append=on") for a in argv)


def test_accel_override(monkeypatch: pytest.MonkeyPatch) -> None:
    detect.cache_clear()
    monkeypatch.setenv(ENV, "tcg")
    assert detect("auto") == Accel(TCG, TCG_SCALE, "requested")
    assert detect("kvm").name == "kvm"  # the command-line option wins over the environment
    assert detect("tcg").timeout(60) == 600
    detect.cache_clear()


def test_accel_auto_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    require(firmware_missing(), "the KVM probe")
    detect.cache_clear()
    monkeypatch.delenv(ENV, raising=False)
    accel = detect("auto")
    assert accel.name in ("kvm", "tcg") and accel.reason
    assert accel.scale == (1.0 if accel.name == "kvm" else TCG_SCALE)
    detect.cache_clear()
