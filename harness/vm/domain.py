"""Libvirt domain XML, built from a dataclass (no templates): q35, OVMF with a per-VM vars file,
the VM's SMBIOS serial (<sysinfo>), one virtio boot disk (and any extra ones), a serial console
written to a file, and QEMU user networking with SSH forwarded to a loopback port (passed through
<qemu:commandline>, since libvirt's own user networking maps ports only through passt)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from harness.vm.spec import MachineSpec

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


@dataclass(frozen=True)
class DomainConfig:
    name: str
    domain_type: str  # "kvm" or "qemu" (TCG)
    memory_mib: int
    cpus: int
    firmware_code: Path
    vars_file: Path
    disk: Path
    console_log: Path
    ssh_port: int
    serial: str
    extra_disks: tuple[Path, ...] = ()
    emulator: str = "/usr/bin/qemu-system-x86_64"

    @classmethod
    def from_spec(cls, spec: MachineSpec) -> DomainConfig:
        return cls(
            name=spec.name,
            domain_type="kvm" if spec.accel.name == "kvm" else "qemu",
            memory_mib=spec.memory_mib,
            cpus=spec.cpus,
            firmware_code=spec.firmware.code,
            vars_file=spec.vars_file,
            disk=spec.disk,
            console_log=spec.console_log,
            ssh_port=spec.ssh_port,
            serial=spec.serial,
            extra_disks=spec.extra_disks,
        )

    def to_xml(self) -> str:
        ET.register_namespace("qemu", QEMU_NS)
        domain = ET.Element("domain", {"type": self.domain_type})
        _text(domain, "name", self.name)
        _text(domain, "memory", str(self.memory_mib), unit="MiB")
        _text(domain, "vcpu", str(self.cpus))
        os_ = ET.SubElement(domain, "os")
        _text(os_, "type", "hvm", arch="x86_64", machine="q35")
        _text(os_, "loader", str(self.firmware_code), readonly="yes", type="pflash")
        _text(os_, "nvram", str(self.vars_file))
        ET.SubElement(os_, "smbios", mode="sysinfo")  # the guest's product_serial (machine.py)
        system = ET.SubElement(ET.SubElement(domain, "sysinfo", type="smbios"), "system")
        _text(system, "entry", self.serial, name="serial")
        features = ET.SubElement(domain, "features")
        ET.SubElement(features, "acpi")
        ET.SubElement(features, "apic")
        if self.domain_type == "qemu":
            # Cap TCG's translation cache like the QEMU backend does (faster warm boots).
            _text(ET.SubElement(features, "tcg"), "tb-cache", "256", unit="MiB")
        if self.domain_type == "kvm":
            ET.SubElement(domain, "cpu", mode="host-passthrough")
        ET.SubElement(domain, "clock", offset="utc")
        # A guest reboot ends the QEMU process; the harness starts it again (see machine.py).
        for event in ("on_poweroff", "on_reboot", "on_crash"):
            _text(domain, event, "destroy")
        devices = ET.SubElement(domain, "devices")
        _text(devices, "emulator", self.emulator)
        ET.SubElement(devices, "controller", type="usb", model="none")  # no xhci for OVMF to probe
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="qcow2", cache="unsafe", discard="unmap")
        ET.SubElement(disk, "source", file=str(self.disk))
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
        ET.SubElement(disk, "boot", order="1")
        for n, extra in enumerate(self.extra_disks, start=1):
            more = ET.SubElement(devices, "disk", type="file", device="disk")
            ET.SubElement(more, "driver", name="qemu", type="qcow2", cache="unsafe", discard="unmap")
            ET.SubElement(more, "source", file=str(extra))
            ET.SubElement(more, "target", dev=f"vd{chr(ord('a') + n)}", bus="virtio")
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=str(self.console_log), append="on")
        ET.SubElement(serial, "target", port="0")
        rng = ET.SubElement(devices, "rng", model="virtio")
        _text(rng, "backend", "/dev/urandom", model="random")
        ET.SubElement(devices, "memballoon", model="none")
        # QEMU runs as root without relabelling: the disks live in the harness's cache and tmp dirs.
        seclabel = ET.SubElement(domain, "seclabel", type="static", model="dac", relabel="no")
        _text(seclabel, "label", "+0:+0")
        commandline = ET.SubElement(domain, f"{{{QEMU_NS}}}commandline")
        for arg in (
            "-netdev",
            f"user,id=hostnet-ssh,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device",
            # A fixed slot: QEMU sees these arguments before libvirt's own devices.
            "virtio-net-pci,netdev=hostnet-ssh,bus=pcie.0,addr=0x10",
        ):
            ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=arg)
        ET.indent(domain)
        return ET.tostring(domain, encoding="unicode") + "\n"


def _text(parent: ET.Element, tag: str, text: str, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    element.text = text
    return element
