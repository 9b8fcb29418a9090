"""The libvirt backend: a transient domain per boot, created from DomainConfig's XML."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from harness.vm import libvirtd
from harness.vm.domain import DomainConfig
from harness.vm.machine import Machine
from harness.vm.spec import MachineSpec


class LibvirtMachine(Machine):
    backend = "libvirt"

    def __init__(self, spec: MachineSpec) -> None:
        super().__init__(spec)
        self.config = DomainConfig.from_spec(spec)
        self._conn: Any = libvirtd.connect()

    def _domain(self) -> Any:
        import libvirt

        try:
            return self._conn.lookupByName(self.spec.name)
        except libvirt.libvirtError:
            return None

    def _launch(self) -> None:
        self._conn.createXML(self.describe(), 0)

    def is_running(self) -> bool:
        import libvirt

        domain = self._domain()
        if domain is None:
            return False
        try:
            return bool(domain.isActive())
        except libvirt.libvirtError:
            return False

    def _kill(self) -> None:
        import libvirt

        domain = self._domain()
        if domain is not None:
            with contextlib.suppress(libvirt.libvirtError):  # it may have stopped by itself meanwhile
                domain.destroy()

    def describe(self) -> str:
        return self.config.to_xml()

    def save_backend_artifacts(self, directory: Path) -> None:
        (directory / "domain.xml").write_text(self.describe())
        log = Path("/var/log/libvirt/qemu") / f"{self.spec.name}.log"
        if log.exists():
            (directory / "libvirt-qemu.log").write_bytes(log.read_bytes())

    def kill_hint(self) -> str:
        return f"virsh destroy {self.spec.name}"

    def close(self) -> None:
        """Close the libvirt connection (the machine cannot be started again afterwards)."""
        self._conn.close()
