"""SSH to guests with paramiko: wait with backoff under a deadline, run, put/get, reboot helpers.

The harness's key pair lives in the build cache (`<cache>/ssh/id_ed25519`), made once with
ssh-keygen; its public half is baked into every guest image as root's authorized key.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import paramiko

from harness.cache import file_lock, subdir
from harness.run import run as run_host

# While a guest boots, QEMU's port forward accepts connections that then drop: paramiko logs each
# failed banner read with a traceback. connect() retries and reports the last error itself.
logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)

EOF_GRACE = 5.0  # seconds run() waits for the end of a command's output after its exit status


class SSHError(RuntimeError):
    pass


class CommandFailed(SSHError):
    def __init__(self, command: str, result: Result) -> None:
        self.result = result
        tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-3:]
        super().__init__(f"guest command {command!r} exited {result.exit_code}: {' | '.join(tail)}")


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: str


def ensure_keypair() -> KeyPair:
    """The harness's SSH key pair, generated on first use."""
    directory = subdir("ssh")
    private = directory / "id_ed25519"
    with file_lock("ssh-key"):
        if not private.is_file():
            part = directory / "id_ed25519.part"
            for p in (part, part.with_suffix(".part.pub")):
                p.unlink(missing_ok=True)
            run_host(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bootc-unified-harness", "-f", part]
            )
            part.with_suffix(".part.pub").rename(private.with_suffix(".pub"))
            part.rename(private)
    return KeyPair(private, private.with_suffix(".pub").read_text().strip())


@dataclass(frozen=True)
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class SSH:
    host: str
    port: int
    key: Path
    user: str = "root"
    _client: paramiko.SSHClient | None = field(default=None, repr=False)

    # -- connection ---------------------------------------------------------------------

    def connect(self, timeout: float, abort: Callable[[], str | None] | None = None) -> float:
        """Connect, retrying with backoff until `timeout` seconds pass; returns the seconds it took.
        `abort`, asked after each failed attempt, returns why waiting longer is pointless (say, the
        guest's kernel panicked) to stop at once, or None to go on."""
        started = time.monotonic()
        deadline = started + timeout
        delay = 0.5
        last: Exception | None = None
        self.close()
        while time.monotonic() < deadline:
            client = paramiko.SSHClient()
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            try:
                client.connect(
                    self.host,
                    port=self.port,
                    username=self.user,
                    key_filename=str(self.key),
                    timeout=10,
                    banner_timeout=30,
                    auth_timeout=30,
                    allow_agent=False,
                    look_for_keys=False,
                )
                transport = client.get_transport()
                assert transport is not None
                transport.set_keepalive(5)
                self._client = client
                return time.monotonic() - started
            except (OSError, paramiko.SSHException, EOFError) as e:
                last = e
                client.close()
                why = abort() if abort is not None else None
                if why is not None:
                    raise SSHError(f"gave up waiting for SSH on {self.host}:{self.port}: {why}") from e
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 1.5, 5.0)
        raise SSHError(f"no SSH on {self.host}:{self.port} within {timeout:.0f}s (last error: {last!r})")

    @property
    def connected(self) -> bool:
        if self._client is None:
            return False
        transport = self._client.get_transport()
        return transport is not None and transport.is_active()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> SSH:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _transport(self) -> paramiko.Transport:
        if self._client is None:
            raise SSHError(f"not connected to {self.host}:{self.port}")
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise SSHError(f"SSH connection to {self.host}:{self.port} is gone")
        return transport

    # -- commands -----------------------------------------------------------------------

    def run(self, command: str | list[str], timeout: float = 300.0, check: bool = True) -> Result:
        """Run `command` (a shell string, or argv that gets quoted); wait up to `timeout` seconds."""
        text = command if isinstance(command, str) else shlex.join(command)
        channel = self._transport().open_session()
        try:
            channel.exec_command(text)
            channel.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + timeout
            status_seen = 0.0
            while True:
                progressed = False
                while channel.recv_ready():
                    out += channel.recv(65536)
                    progressed = True
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                    progressed = True
                # Done once the exit status *and* the end of the output are in: the server may send
                # the status before the last output (a CI run lost the last line of a command's
                # stdout when this waited for the status alone). A command that leaves a child
                # holding its stdout open gets EOF_GRACE seconds after its status.
                drained = not channel.recv_ready() and not channel.recv_stderr_ready()
                if channel.exit_status_ready() and drained:
                    status_seen = status_seen or time.monotonic()
                    if channel.eof_received or time.monotonic() - status_seen > EOF_GRACE:
                        break
                if channel.closed and not progressed:
                    break
                if time.monotonic() > deadline:
                    raise SSHError(f"guest command {text!r} did not finish within {timeout:.0f}s")
                if not progressed:
                    time.sleep(0.05)
            code = channel.recv_exit_status() if channel.exit_status_ready() else -1
        finally:
            channel.close()
        result = Result(code, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and not result.ok:
            raise CommandFailed(text, result)
        return result

    def start(self, command: str) -> None:
        """Start `command` without waiting for it (for commands that take the connection down)."""
        channel = self._transport().open_session()
        channel.exec_command(command)

    def put(self, local: Path, remote: str) -> None:
        assert self._client is not None
        with self._client.open_sftp() as sftp:
            sftp.put(str(local), remote)

    def get(self, remote: str, local: Path) -> None:
        assert self._client is not None
        with self._client.open_sftp() as sftp:
            sftp.get(remote, str(local))

    # -- facts and reboots --------------------------------------------------------------

    def boot_id(self) -> str:
        return self.run("cat /proc/sys/kernel/random/boot_id", timeout=60).stdout.strip()

    def soft_reboots_count(self) -> int:
        out = self.run("systemctl show --value -p SoftRebootsCount", timeout=60).stdout.strip()
        return int(out or "0")

    def wait_for_drop(self, timeout: float) -> None:
        """Wait until the connection goes away (the guest went down)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.run("true", timeout=10)
            except (SSHError, OSError, EOFError, paramiko.SSHException, TimeoutError):
                self.close()
                return
            time.sleep(1)
        raise SSHError(f"the SSH connection to {self.host}:{self.port} stayed up for {timeout:.0f}s")


@dataclass(frozen=True)
class Reboot:
    boot_id_before: str
    boot_id_after: str
    soft_reboots_before: int
    soft_reboots_after: int
    seconds: float


def reboot(
    ssh: SSH,
    timeout: float,
    *,
    soft: bool = False,
    after_drop: Callable[[], None] | None = None,
    after_connect: Callable[[], None] | None = None,
    abort: Callable[[], str | None] | None = None,
) -> Reboot:
    """Reboot the guest and reconnect; checks a new boot_id (reboot) or SoftRebootsCount+1 (soft).

    `after_drop` runs once the connection is gone: the machine layer restarts a QEMU that exited
    on reboot there (QEMU's -no-reboot, libvirt's on_reboot=destroy). `after_connect` runs once
    SSH answers again, before anything is read from the guest: the machine layer checks there that
    the connection reached its own VM. `abort` is passed to SSH.connect."""
    started = time.monotonic()
    before = ssh.boot_id()
    soft_before = ssh.soft_reboots_count()
    ssh.start("sleep 1; systemctl soft-reboot" if soft else "sleep 1; systemctl reboot")
    ssh.wait_for_drop(timeout)
    if after_drop is not None:
        after_drop()
    ssh.connect(max(1.0, started + timeout - time.monotonic()), abort=abort)
    if after_connect is not None:
        after_connect()
    after = ssh.boot_id()
    soft_after = ssh.soft_reboots_count()
    if soft:
        if after != before or soft_after != soft_before + 1:
            raise SSHError(
                f"soft reboot not seen: boot_id {before} -> {after}, "
                f"SoftRebootsCount {soft_before} -> {soft_after}"
            )
    elif after == before:
        raise SSHError(f"reboot not seen: boot_id is still {after}")
    return Reboot(before, after, soft_before, soft_after, time.monotonic() - started)
