"""UEFI firmware (OVMF): the read-only code image and a template for each VM's writable vars."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

# (code, vars template), first match wins; no Secure Boot builds: the chain is unsigned.
CANDIDATES = [
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),  # Debian 12+
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),  # older Debian/Ubuntu
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),  # Fedora
]


class FirmwareNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class Firmware:
    code: Path
    vars_template: Path

    def new_vars(self, dest: Path) -> Path:
        """A writable copy of the vars template for one VM (kept across its reboots)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.vars_template, dest)
        return dest


def find_firmware() -> Firmware:
    for code, vars_template in CANDIDATES:
        if Path(code).is_file() and Path(vars_template).is_file():
            return Firmware(Path(code), Path(vars_template))
    raise FirmwareNotFound(f"no OVMF firmware (Debian package ovmf); looked for {[c for c, _ in CANDIDATES]}")


def missing_prerequisites() -> list[str]:
    try:
        find_firmware()
    except FirmwareNotFound as e:
        return [str(e)]
    return []
