"""Fast checks of the VM harness's pure parts: console scanning, domain XML, QEMU command line,
teardown order. (tests/vm/test_harness_vm.py boots guests for the identity and KVM checks.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from harness.pytest_plugin import require
from harness.pytest_vm import finish_machines
from harness.ssh import SSH, SSHError
from harness.vm import Machine, MachineError, console
from harness.vm.accel import ENV, TCG, TCG_SCALE, Accel, detect, kvm_works
from harness.vm.domain import DomainConfig
from harness.vm.firmware import Firmware
from harness.vm.qemu import qemu_argv
from harness.vm.spec import MachineSpec, free_port

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
        ("[   12.345678] ------------[ cut here ]------------", "kernel WARNING"),
        (
            "[   12.345700] WARNING: CPU: 0 PID: 1 at fs/ext4/inode.c:5123 ext4_evict_inode+0x1d5/0x1e0",
            "kernel WARNING",
        ),
        ("[   13.100000] WARNING: possible circular locking dependency detected", "kernel WARNING"),
        ("[   12.346000] Call Trace:", "kernel call trace"),
        ("[  242.100000] INFO: task systemd-journal:341 blocked for more than 120 seconds.", "hung task"),
        ("[   60.100000] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:", "RCU stall"),
        ("[   60.200000] rcu: INFO: rcu_sched self-detected stall on CPU", "RCU stall"),
        (
            "[    9.100000] EXT4-fs error (device vda2): ext4_lookup:1855: inode #2: comm ls: deleted inode",
            "ext4 error",
        ),
        (
            "[    9.200000] BTRFS error (device vda2): bad tree block start, mirror 1 want 30408704 have 0",
            "btrfs error",
        ),
        (
            "[    9.300000] BTRFS critical (device vda2): corrupt leaf: root=5 block=30408704 slot=3",
            "btrfs error",
        ),
        ("[    9.400000] XFS (vda2): Corruption detected. Unmount and run xfs_repair", "XFS corruption"),
        (
            "[    9.500000] XFS (vda2): Metadata corruption detected at xfs_dinode_verify+0x1a/0x2b",
            "XFS corruption",
        ),
        (
            "[\x1b[0;1;31mFAILED\x1b[0m] Failed to start systemd-networkd.service - Network Configuration.",
            "systemd unit failed",
        ),
        (
            "[\x1b[0;1;33mDEPEND\x1b[0m] Dependency failed for sshd.service - OpenBSD Secure Shell server.",
            "systemd unit failed",
        ),
        (
            "[    2.100000] systemd[1]: sockets.target: Found ordering cycle on basic.target/start",
            "systemd ordering cycle",
        ),
        (
            "[   80.100000] podman invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE), order=0",
            "out of memory",
        ),
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


# Benign lines from real boots of the guest (artifacts/vm/*/console.log) that resemble trouble.
BENIGN = [
    "[    0.194141] rcu: Preemptible hierarchical RCU implementation.",
    "[    0.194331] \tTrampoline variant of Tasks RCU enabled.",
    "[    0.240753] rcu: srcu_init: Setting srcu_struct sizes based on contention.",
    '[    1.152452] PCI: Using host bridge windows from ACPI; if necessary, use "pci=nocrs" and report a bug',
    "[    4.226142] RAS: Correctable Errors collector initialized.",
    "Warning: fsck not present, so skipping root file system",
    "WARNING: apt does not have a stable CLI interface. Use with caution in scripts.",
    "[   20.1] (sd-exec-[258]: /usr/lib/systemd/system-generators/systemd-ssh-generator "
    "failed with exit status 1.",
    "[   39.533999] platform regulatory.0: firmware: failed to load regulatory.db (-2)",
    "[    5.1] EXT4-fs (vda2): mounted filesystem 8ed7d709 r/w with ordered data mode. Quota mode: none.",
    "[    5.200000] BTRFS info (device vda2): first mount of filesystem 68e06772-f406-5133-a032-38f99da15d25",
    "[    5.300000] XFS (vda2): Mounting V5 Filesystem f6e12005-ab65-523f-a7b4-1a90944365f4",
    "[    5.400000] XFS (vda2): Ending clean mount",
    "[\x1b[0;32m  OK  \x1b[0m] Listening on systemd-coredump.socket - Process Core Dump Socket.",
    "[\x1b[0;32m  OK  \x1b[0m] Finished systemd-fsck-root.service - File System Check on Root Device.",
    "         Mounting sys-kernel-tracing.mount - Kernel Trace File System...",
    "[   30.000000] reboot: Power down",
]


@pytest.mark.parametrize("line", BENIGN)
def test_benign_console_lines_pass(line: str) -> None:
    assert console.scan(CLEAN + line + "\n") == []


def test_clean_console_passes(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text(CLEAN)
    console.check(log)
    console.check(log, boots=1)
    assert console.scan(CLEAN) == []


def test_trouble_in_accepted_lines_only_is_not_trouble(tmp_path: Path) -> None:
    """Machine.trouble_expected: lines a test broke on purpose are accepted, the same trouble
    before or after them is not."""
    log = tmp_path / "console.log"
    trouble = "Begin: Running /scripts/local-bottom ... \nbootc-unified: cannot mount\nDropping to a shell!\n"
    log.write_text(CLEAN + trouble + CLEAN)
    first = CLEAN.count("\n") + 1
    accepted = [range(first, first + 3)]
    console.check(log, boots=2, accepted=accepted)
    with pytest.raises(console.ConsoleError, match="initramfs shell at console line"):
        console.check(log, boots=2, accepted=[range(first, first + 2)])  # one line short
    log.write_text(CLEAN + trouble + CLEAN + "Dropping to a shell!\n")
    with pytest.raises(console.ConsoleError, match="initramfs shell"):
        console.check(log, boots=2, accepted=accepted)


def test_accepted_lines_match_only_what_they_name(tmp_path: Path) -> None:
    """Machine.expect_console_lines: a btrfs checksum failure the test caused is accepted at any
    line; another btrfs error is still trouble."""
    log = tmp_path / "console.log"
    csum = "[ 2.1] BTRFS error (device vda2): bdev /dev/vda2 errs: wr 0, rd 0, flush 0, corrupt 16, gen 0\n"
    accepted = [
        re.compile(r"BTRFS error \(device vd[a-z]\d+\): bdev /dev/vd[a-z]\d+ errs: .* corrupt \d+, gen 0$")
    ]
    log.write_text(CLEAN + csum)
    console.check(log, boots=1, accepted_lines=accepted)
    log.write_text(CLEAN + csum + "[  240.1] BTRFS error (device vda2): failed to read chunk tree\n")
    with pytest.raises(console.ConsoleError, match="failed to read chunk tree"):
        console.check(log, boots=1, accepted_lines=accepted)


def test_missing_console_log_fails(tmp_path: Path) -> None:
    with pytest.raises(console.ConsoleError, match="serial console log is missing"):
        console.check(tmp_path / "console.log")


@pytest.mark.parametrize(("logged", "boots"), [(1, 2), (2, 1), (0, 1), (2, 3)])
def test_one_kernel_banner_per_boot(tmp_path: Path, logged: int, boots: int) -> None:
    """The log accumulates across QEMU restarts: N boots must show N "Linux version" lines."""
    log = tmp_path / "console.log"
    log.write_text("BdsDxe: loading Boot0001\n" + CLEAN * logged)
    console.check(log, boots=logged)
    with pytest.raises(console.ConsoleError) as info:
        console.check(log, boots=boots)
    assert f"{logged} kernel banner(s) ('Linux version ...') for {boots} boot(s)" in str(info.value)


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


def test_serials_are_unique_and_safe(tmp_path: Path) -> None:
    one, two = spec(tmp_path), spec(tmp_path)
    assert one.serial.startswith("bootc-unified-test-") and one.serial != two.serial
    with pytest.raises(ValueError, match="VM serial 'a,b'"):
        MachineSpec(**{**one.__dict__, "serial": "a,b"})


def test_domain_xml_is_valid_libvirt(tmp_path: Path) -> None:
    machine = replace(spec(tmp_path), extra_disks=(tmp_path / "target.qcow2",))
    xml = DomainConfig.from_spec(machine).to_xml()
    root = ET.fromstring(xml)
    smbios = root.find("os/smbios")
    assert smbios is not None and smbios.get("mode") == "sysinfo"
    entry = root.find("sysinfo[@type='smbios']/system/entry[@name='serial']")
    assert entry is not None and entry.text == machine.serial
    targets = [(d.find("source").get("file"), d.find("target").get("dev")) for d in root.iter("disk")]  # type: ignore[union-attr]
    assert targets == [(str(machine.disk), "vda"), (str(tmp_path / "target.qcow2"), "vdb")]
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
    machine = replace(spec(tmp_path), extra_disks=(tmp_path / "target.qcow2",))
    argv = qemu_argv(machine)
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive" and "id=disk" in argv[i + 1]]
    assert [d.rsplit("file=", 1)[1] for d in drives] == [str(machine.disk), str(tmp_path / "target.qcow2")]
    assert argv[argv.index("-smbios") + 1] == f"type=1,serial={machine.serial}"
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


def test_kvm_probe_without_device(tmp_path: Path) -> None:
    """No /dev/kvm: the probe says so without starting QEMU (tests/vm/test_harness_vm.py checks
    the probe's decision against a real boot where the device exists)."""
    missing = Firmware(tmp_path / "no-code.fd", tmp_path / "no-vars.fd")
    assert kvm_works(missing, device=str(tmp_path / "kvm")) == (
        False,
        f"{tmp_path / 'kvm'} is missing or not accessible",
    )


def test_waiting_for_ssh_stops_when_told_why(tmp_path: Path) -> None:
    """A real connection attempt to a port nobody listens on: `abort` ends the wait at once."""
    port = free_port()
    asked: list[int] = []

    def abort() -> str | None:
        asked.append(1)
        return "Kernel panic at console line 7" if len(asked) == 2 else None

    started = time.monotonic()
    with pytest.raises(
        SSHError, match=f"gave up waiting for SSH on 127.0.0.1:{port}: Kernel panic at console"
    ):
        SSH("127.0.0.1", port, tmp_path / "id").connect(30, abort=abort)
    assert len(asked) == 2 and time.monotonic() - started < 10


class StuckMachine(Machine):
    """A backend whose VM cannot be stopped, with a panic on its console."""

    backend = "stuck"

    def _launch(self) -> None:
        self.spec.console_log.write_text(CLEAN + "[    9.0] Kernel panic - not syncing: test\n")

    def is_running(self) -> bool:
        return self.boots > 0

    def _kill(self) -> None:
        raise MachineError("kill refused")

    def describe(self) -> str:
        return "stuck"

    def save_backend_artifacts(self, directory: Path) -> None:
        (directory / "stuck.txt").write_text("stuck\n")


def test_teardown_checks_the_console_when_destroy_fails(tmp_path: Path) -> None:
    machine_spec = spec(tmp_path)
    machine_spec.workdir.mkdir(parents=True)
    machine_spec.vars_file.write_bytes(b"")
    machine = StuckMachine(machine_spec)
    machine.start()
    errors = finish_machines([machine], lambda m: tmp_path / "artifacts", keep=False)
    assert [type(e).__name__ for e in errors] == ["MachineError", "ConsoleError"]
    assert "destroying bootc-unified-test (stuck) failed: kill refused" in str(errors[0])
    assert "kernel panic at console line 4" in str(errors[1])
    assert (tmp_path / "artifacts" / "console.log").read_text() == machine_spec.console_log.read_text()
