"""The one VM interface every test uses; backends (libvirt, qemu) only start and stop the VM.

start -> wait_ssh -> run/put/get -> reboot (new boot_id) / soft_reboot -> poweroff | destroy.

Reboots: VMs run with QEMU's -no-reboot (libvirt: on_reboot=destroy), so a guest reboot ends the
QEMU process and the harness starts it again with the same disk and vars file. Under TCG this
avoids the slowdown of warm reboots inside one QEMU process, and a reboot that hangs in firmware
is seen as a hang rather than masked.

Identity: ports are picked free a moment before QEMU binds them, every guest has the same SSH key
and host keys are not pinned, so a VM whose QEMU lost its port would run its test in whichever
guest holds it. Each VM therefore gets its own SMBIOS serial (MachineSpec.serial) and, whenever SSH
connects (boot, reboot, soft reboot), `verify_identity` checks that the VM is still running and
that the guest reports that serial.

Console: every check also counts kernel banners against the boots started (console.py), and a
wait for SSH (boot, reboot) ends as soon as the console shows trouble, not at its timeout.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from harness.ssh import SSH, Reboot, Result, reboot
from harness.vm import console
from harness.vm.spec import MachineSpec

# Seconds on KVM; multiplied by the accelerator's scale (x10 on TCG).
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
COMMAND_TIMEOUT = 60.0
SERIAL_PATH = "/sys/class/dmi/id/product_serial"


class MachineError(RuntimeError):
    pass


class WrongMachine(MachineError):
    """SSH reached a guest that is not this VM (or this VM is not running)."""


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
        self.accepted_console: list[range] = []  # console line numbers trouble_expected() covered
        self.accepted_lines: list[re.Pattern[str]] = []  # expect_console_lines()
        self.boots = 0  # VM processes started: each one boots a kernel (console banners)
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
        self.boots += 1

    def wait_ssh(self, timeout: float | None = None) -> float:
        """Wait until SSH answers, then check that it reached this VM and that the console is
        clean; returns seconds since start(). On failure the console is checked for trouble first."""
        limit = timeout if timeout is not None else self.timeout(BOOT_TIMEOUT)
        try:
            self.ssh.connect(limit, abort=self.console_trouble)
        except Exception as e:
            log = self.spec.console_log
            if log.is_file():
                # trouble on the console explains the failure best
                console.check(log, accepted=self.accepted_console, accepted_lines=self.accepted_lines)
            text = self.console_text()
            state = "running" if self.is_running() else "not running"
            raise MachineError(
                f"{self.spec.name} ({self.backend}, {state}): {e}; console: {log} "
                f"({console.banners(text)} kernel banner(s) for {self.boots} boot(s))"
            ) from e
        took = time.monotonic() - self._started_at
        self.verify_identity()
        self.check_console()
        self.timings.boots_to_ssh.append(took)
        return took

    def console_trouble(self) -> str | None:
        """The first trouble on the console so far (see console.py), or None: waiting for SSH
        stops there, since the test fails on it anyway (a panicked guest never answers)."""
        findings = console.scan(self.console_text(), self.accepted_console, self.accepted_lines)
        return str(findings[0]) if findings else None

    def verify_identity(self) -> None:
        """Raise WrongMachine unless this VM is running and the guest SSH reached reports this
        VM's SMBIOS serial. The connection is closed on a mismatch, so nothing else runs there."""
        got = self.ssh.run(["cat", SERIAL_PATH], timeout=self.timeout(COMMAND_TIMEOUT), check=False)
        seen = got.stdout.strip() if got.ok else f"unreadable ({got.stderr.strip() or got.exit_code})"
        running = self.is_running()
        if running and seen == self.spec.serial:
            return
        self.ssh.close()
        raise WrongMachine(
            f"{self.spec.name} ({self.backend}, {'running' if running else 'not running'}) expects "
            f"serial {self.spec.serial}, but SSH on 127.0.0.1:{self.spec.ssh_port} reached a guest "
            f"with serial {seen}"
        )

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
            self.ssh,
            self.timeout(BOOT_TIMEOUT + STOP_TIMEOUT),
            after_drop=self._restart_after_reboot,
            after_connect=self.verify_identity,
            abort=self.console_trouble,
        )
        self.timings.reboots.append(result.seconds)
        self.check_console()
        return result

    def soft_reboot(self) -> Reboot:
        """`systemctl soft-reboot`: same kernel and boot_id, SoftRebootsCount + 1."""
        result = reboot(
            self.ssh,
            self.timeout(BOOT_TIMEOUT),
            soft=True,
            after_connect=self.verify_identity,
            abort=self.console_trouble,
        )
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
        """Raise console.ConsoleError when the console log is missing, shows trouble, or does not
        show one kernel banner per boot. Nothing to check on a machine that was never started."""
        if self.boots:
            console.check(
                self.spec.console_log,
                boots=self.boots,
                accepted=self.accepted_console,
                accepted_lines=self.accepted_lines,
            )

    def expect_console_lines(self, pattern: str) -> None:
        """From now on, console lines matching `pattern` are not trouble: for damage a test made
        on purpose that the kernel reports whenever anything reads it (btrfs checksum failures of a
        tampered file), however late. Keep the pattern as narrow as the damage."""
        self.accepted_lines.append(re.compile(pattern))

    @contextmanager
    def trouble_expected(self) -> Iterator[None]:
        """Console lines written while the body runs are not trouble: for a test that breaks the
        guest on purpose (a tampered image that must fail to boot) and asserts the failure itself."""
        first = console.line_count(self.console_text()) + 1
        try:
            yield
        finally:
            self.accepted_console.append(range(first, console.line_count(self.console_text()) + 1))

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
