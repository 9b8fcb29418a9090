"""The VM harness against real guests: SSH that reaches another VM is caught (SMBIOS serials), and
the KVM/TCG decision agrees with what a real boot under KVM shows. One guest filesystem is enough
(the first one selected with --fs)."""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path

import pytest

from harness.pytest_plugin import selected_kinds
from harness.pytest_vm import GUEST_MEMORY_MIB, DiskFactory, VmFactory
from harness.ssh import SSH, KeyPair
from harness.vm import Accel, MachineSpec, WrongMachine, console, create, detect, find_firmware, free_port
from harness.vm.accel import ENV, KVM, KVM_DEVICE, TCG, TCG_SCALE
from harness.vm.machine import BOOT_TIMEOUT

pytestmark = [pytest.mark.vm, pytest.mark.slow]


@pytest.fixture
def fs(pytestconfig: pytest.Config) -> str:
    return selected_kinds(pytestconfig)[0]


def test_ssh_into_another_vm_is_caught(
    fs: str, disk_factory: DiskFactory, vm_factory: VmFactory, tmp_path: Path
) -> None:
    """The race the serial guards against, for real: a second VM is given the port the first one
    holds, so its QEMU cannot bind it and exits, while SSH on that port reaches the first guest."""
    first = vm_factory(disk_factory("v1", fs))  # booted: wait_ssh verified its own serial
    spec = MachineSpec(
        name=f"{first.spec.name}-second",
        disk=disk_factory("v1", fs).path,
        workdir=tmp_path / "second",
        accel=first.spec.accel,
        firmware=first.spec.firmware,
        ssh_port=first.spec.ssh_port,
        ssh_key=first.spec.ssh_key,
        memory_mib=GUEST_MEMORY_MIB,
    )
    second = create("qemu", spec)
    try:
        second.start()
        with pytest.raises(WrongMachine) as info:
            second.wait_ssh()
        deadline = time.monotonic() + 30
        while second.is_running() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        second.destroy()
    message = str(info.value)
    assert "\n" not in message
    assert f"expects serial {second.spec.serial}" in message
    assert f"reached a guest with serial {first.spec.serial}" in message
    assert "Could not set up host forwarding rule" in (spec.workdir / "qemu.log").read_text()
    assert not second.ssh.connected  # nothing more runs over the wrong connection

    # The same real connection with a wrong expectation: the serial comparison itself fails.
    impostor = copy.copy(first)
    impostor.spec = dataclasses.replace(first.spec, serial=f"{first.spec.serial}-x")
    impostor.ssh = SSH("127.0.0.1", first.spec.ssh_port, first.spec.ssh_key)
    impostor.ssh.connect(60)
    with pytest.raises(
        WrongMachine, match=f"expects serial {impostor.spec.serial}, but .* serial {first.spec.serial}$"
    ):
        impostor.verify_identity()
    first.verify_identity()  # the first VM is still itself


def kernel_starts_under_kvm(disk: Path, workdir: Path, key: KeyPair) -> tuple[bool, str]:
    """Boot the guest disk through OVMF under KVM on plain QEMU; (did the kernel banner appear
    within the KVM boot timeout, what was seen)."""
    spec = MachineSpec(
        name=f"bootc-unified-kvm-check-{os.getpid()}",
        disk=disk,
        workdir=workdir,
        accel=Accel(KVM, 1.0, "a real boot under KVM"),
        firmware=find_firmware(),
        ssh_port=free_port(),
        ssh_key=key.private,
        memory_mib=GUEST_MEMORY_MIB,
    )
    machine = create("qemu", spec)
    qemu_log = workdir / "qemu.log"
    started = time.monotonic()
    machine.start()
    try:
        while True:
            took = time.monotonic() - started
            if console.banners(machine.console_text()):
                return True, f"printed the kernel banner after {took:.0f}s"
            log = qemu_log.read_text(errors="replace")
            if "KVM internal error" in log:  # QEMU stops the guest and waits: no need to wait on
                return False, f"stopped with a KVM internal error after {took:.0f}s, before the kernel"
            if not machine.is_running():
                return False, f"ended before the kernel: {log.strip()[-200:]}"
            if took > BOOT_TIMEOUT:
                return False, f"showed no kernel banner within {BOOT_TIMEOUT:.0f}s"
            time.sleep(0.5)
    finally:
        machine.destroy()


def test_accel_decision_matches_a_real_boot(
    fs: str,
    accel: Accel,
    disk_factory: DiskFactory,
    ssh_keypair: KeyPair,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`auto` picks TCG where /dev/kvm is missing; where it exists, it picks KVM exactly when a
    real boot of the guest under KVM reaches the kernel (here KVM exists but guests stop in the
    firmware, so the answer must be TCG)."""
    monkeypatch.delenv(ENV, raising=False)
    detect.cache_clear()
    try:
        chosen = detect("auto")
    finally:
        detect.cache_clear()
    assert chosen.scale == (1.0 if chosen.name == KVM else TCG_SCALE)
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        assert chosen.name == TCG, chosen
        assert KVM_DEVICE in chosen.reason
        return
    booted, seen = kernel_starts_under_kvm(disk_factory("v1", fs).path, tmp_path / "kvm-check", ssh_keypair)
    assert (chosen.name == KVM) == booted, (
        f"the probe chose {chosen.name} ({chosen.reason}), but a real boot under KVM {seen}"
    )
