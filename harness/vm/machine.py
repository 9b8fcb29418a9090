"""The one VM interface every test uses; backends (libvirt, qemu) only start and stop the VM.

start -> wait_ssh -> run/put/get -> reboot (new boot_id) / soft_reboot -> poweroff | destroy.

Reboots: VMs run with QEMU's -no-reboot (libvirt: on_reboot=destroy), so a guest reboot ends the
QEMU process and the harness starts it again with the same disk and vars file. Under TCG this
avoids the slowdown of warm reboots inside one QEMU process, and a reboot that hangs in firmware
is seen as a hang rather than masked.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from harness.ssh import SSH, Reboot, Result, reboot
from harness.vm import console
from harness.vm.spec import MachineSpec

# Seconds on KVM; multiplied by the accelerator's scale (x10 on TCG).
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
COMMAND_TIMEOUT = 60.0


class MachineError(RuntimeError):
    pass


@dataclass
class Timings:
    boots_to_ssh: list[float] = field(default_factory=list)
    reboots: list[float] = field(default_factory=list)


class Machine(ABC):
    backend = "abstract"

    def __init__(self, spec: MachineSpec) -> None:
        self.spec = spec
        self.ssh = SSH("127.0.0.1", spec.ssh_port, spec.ssh_key)
        self.timings = Timings()
        self._started_at = 0.0
        spec.workdir.mkdir(parents=True, exist_ok=True)
        if not spec.vars_file.exists():
            spec.firmware.new_vars(spec.vars_file)

    # -- backend -----------------------------------------------------------------------------

    @abstractmethod
    def _launch(self) -> None:
        """Start the VM process (returns at once)."""

    @abstractmethod
    def is_running(self) -> bool: ...

    @abstractmethod
    def _kill(self) -> None:
        """Stop the VM right away (no guest shutdown)."""

    @abstractmethod
    def describe(self) -> str:
        """The backend's definition of this VM: domain XML or the QEMU command line."""

    @abstractmethod
    def save_backend_artifacts(self, directory: Path) -> None: ...

    # -- lifecycle ---------------------------------------------------------------------------

    def timeout(self, seconds: float) -> float:
        return self.spec.accel.timeout(seconds)

    def start(self) -> None:
        if self.is_running():
            raise MachineError(f"{self.spec.name} is already running")
        self._started_at = time.monotonic()
        self._launch()

    def wait_ssh(self, timeout: float | None = None) -> float:
        """Wait until SSH answers; returns seconds since start(). Checks the console on failure."""
        limit = timeout if timeout is not None else self.timeout(BOOT_TIMEOUT)
        try:
            self.ssh.connect(limit)
        except Exception as e:
            self.check_console()
            state = "running" if self.is_running() else "not running"
            raise MachineError(
                f"{self.spec.name} ({self.backend}, {state}): {e}; console: {self.spec.console_log}"
            ) from e
        took = time.monotonic() - self._started_at
        self.timings.boots_to_ssh.append(took)
        return took

    def boot(self) -> float:
        self.start()
        return self.wait_ssh()

    def run(self, command: str | list[str], timeout: float | None = None, check: bool = True) -> Result:
        return self.ssh.run(
            command, timeout=timeout if timeout is not None else self.timeout(COMMAND_TIMEOUT), check=check
        )

    def put(self, local: Path, remote: str) -> None:
        self.ssh.put(local, remote)

    def get(self, remote: str, local: Path) -> None:
        self.ssh.get(remote, local)

    def boot_id(self) -> str:
        return self.ssh.boot_id()

    def reboot(self) -> Reboot:
        """Reboot the guest; returns once SSH answers with a new boot_id."""
        result = reboot(
            self.ssh, self.timeout(BOOT_TIMEOUT + STOP_TIMEOUT), after_drop=self._restart_after_reboot
        )
        self.timings.reboots.append(result.seconds)
        self.check_console()
        return result

    def soft_reboot(self) -> Reboot:
        """`systemctl soft-reboot`: same kernel and boot_id, SoftRebootsCount + 1."""
        result = reboot(self.ssh, self.timeout(BOOT_TIMEOUT), soft=True)
        self.check_console()
        return result

    def _restart_after_reboot(self) -> None:
        self.wait_stopped(self.timeout(STOP_TIMEOUT))
        self.check_console()
        self.start()

    def wait_stopped(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() > deadline:
                raise MachineError(f"{self.spec.name} still running {timeout:.0f}s after its guest went down")
            time.sleep(0.5)

    def poweroff(self) -> None:
        """Clean shutdown from inside the guest; returns once the VM has stopped. The journal of
        every boot is fetched first, so the test's artifacts have it."""
        self.collect_journal()
        self.ssh.start("sleep 1; systemctl poweroff")
        self.ssh.close()
        self.wait_stopped(self.timeout(STOP_TIMEOUT))
        self.check_console()

    def destroy(self) -> None:
        self.ssh.close()
        if self.is_running():
            self._kill()

    # -- evidence ----------------------------------------------------------------------------

    def console_text(self) -> str:
        path = self.spec.console_log
        return path.read_text(errors="replace") if path.exists() else ""

    def check_console(self) -> None:
        console.check(self.spec.console_log)

    @property
    def journal_file(self) -> Path:
        return self.spec.workdir / "journal.txt"

    def collect_journal(self) -> None:
        """Fetch the guest's journal (all boots; it is persistent) into the work directory."""
        try:
            journal = self.ssh.run(
                "journalctl --no-pager -o short-monotonic", timeout=self.timeout(COMMAND_TIMEOUT), check=False
            )
            self.journal_file.write_text(journal.stdout)
        except Exception as e:  # evidence is best effort; the test result stands
            self.journal_file.write_text(f"could not read the journal: {e!r}\n")

    def save_artifacts(self, directory: Path) -> None:
        """Console log, the guest journal (fetched now when the guest answers, else the last one
        fetched) and the backend's VM definition, into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.spec.console_log.exists():
            (directory / "console.log").write_bytes(self.spec.console_log.read_bytes())
        self.save_backend_artifacts(directory)
        if self.ssh.connected:
            self.collect_journal()
        if self.journal_file.exists():
            (directory / "journal.txt").write_bytes(self.journal_file.read_bytes())

    def ssh_hint(self) -> str:
        return (
            f"ssh -i {self.spec.ssh_key} -p {self.spec.ssh_port} -o StrictHostKeyChecking=no "
            f"-o UserKnownHostsFile=/dev/null root@127.0.0.1"
        )
