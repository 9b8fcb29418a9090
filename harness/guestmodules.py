"""Run the harness's standard-library-only oracles inside a guest, with the guest's python3.

`ship(vm)` copies harness/{__init__,checks,diskuse,tamper_guest,treewalk,zerocopy_audit}.py to
GUEST_DIR/harness/;
`run_module(vm, "treewalk", ROOT)` runs `python3 -m harness.treewalk ROOT` there and returns its
stdout. The guest thus records trees and audits objects with the very code the host uses.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from harness.vm import Machine

GUEST_DIR = "/var/tmp/bootc-harness"
MODULES = ("__init__", "checks", "diskuse", "tamper_guest", "treewalk", "zerocopy_audit")
HERE = Path(__file__).resolve().parent


def ship(vm: Machine) -> None:
    vm.run(["mkdir", "-p", f"{GUEST_DIR}/harness"])
    for name in MODULES:
        vm.put(HERE / f"{name}.py", f"{GUEST_DIR}/harness/{name}.py")


def run_module(vm: Machine, module: str, *args: str, timeout: float = 300) -> str:
    command = f"cd {GUEST_DIR} && python3 -m harness.{module} {shlex.join(args)}"
    return vm.run(command, timeout=vm.timeout(timeout)).stdout
