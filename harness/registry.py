"""A local OCI registry on loopback: Debian's `docker-registry` with filesystem storage.

`Registry.start(workdir)` writes a config, starts the registry on 127.0.0.1 on a free port, waits
until `GET /v2/` answers and returns; `stop()` terminates exactly the process it started. Storage
lives in `workdir/data` (the caller owns `workdir`). Nothing listens on anything but 127.0.0.1: the
config sets only `http.addr`, and the debug and metrics listeners stay off.

By hand: `python -m harness.registry [--dir DIR]` prints the address and serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

BINARY = "/usr/bin/docker-registry"
HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class RegistryError(RuntimeError):
    pass


# gorilla/handlers' combined log format, as docker-registry writes its access log:
# 127.0.0.1 - - [29/Nov/2026:09:03:19 +0000] "GET /v2/t/x/blobs/sha256:ab.. HTTP/1.1" 206 4096 "" "ua"
_ACCESS_LINE = re.compile(r'^\S+ \S+ \S+ \[[^]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-) ')


@dataclass(frozen=True)
class Request:
    """One request in the registry's access log: what was asked and how many body bytes it got."""

    method: str
    path: str
    status: int
    bytes: int

    @property
    def blob(self) -> str | None:
        """The digest of a blob GET (`/v2/<name>/blobs/<digest>`), else None."""
        if self.method != "GET":
            return None
        _, sep, digest = self.path.partition("/blobs/")
        return digest if sep and "/" not in digest else None


def parse_access_log(text: str) -> list[Request]:
    """The requests of a registry access log; lines of other kinds (the warn-level log) skipped."""
    found = []
    for line in text.splitlines():
        if m := _ACCESS_LINE.match(line):
            size = m.group(4)
            found.append(Request(m.group(1), m.group(2), int(m.group(3)), 0 if size == "-" else int(size)))
    return found


def manifest_digest(reference: str) -> str:
    """The registry's manifest digest of `reference` (HOST:PORT/repo:tag), as skopeo reads it."""
    proc = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{reference}"],
        capture_output=True,
        text=True,
        check=True,
    )
    digest: str = json.loads(proc.stdout)["Digest"]
    return digest


def missing_prerequisites() -> list[str]:
    """What stops a local registry from running here, one phrase each (empty: all good)."""
    if not os.access(BINARY, os.X_OK):
        return [f"{BINARY} (Debian package docker-registry)"]
    return []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def config_yaml(storage: Path, port: int, access_log: bool = False) -> str:
    """The registry's config; `access_log` writes one combined-format line per request (status
    and body bytes sent) to the registry's stdout, i.e. its log file: bytes served, as an oracle."""
    # JSON strings are valid YAML scalars, so paths with odd characters stay quoted correctly.
    return "\n".join(
        [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  accesslog:",
            f"    disabled: {'false' if access_log else 'true'}",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {json.dumps(str(storage))}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {json.dumps(f'{HOST}:{port}')}",
            f"  secret: {json.dumps(secrets.token_hex(16))}",
            "",
        ]
    )


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/", timeout=2) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Registry:
    workdir: Path
    port: int
    process: subprocess.Popen[bytes] = field(repr=False)
    log: Path = field(repr=False)
    access_log: bool = False

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @classmethod
    def start(cls, workdir: Path, attempts: int = 3, access_log: bool = False) -> Registry:
        """Start a registry storing into `workdir/data`; retry on another port if one was taken.
        With `access_log`, every request is logged (see `requests`)."""
        problems = missing_prerequisites()
        if problems:
            raise RegistryError(f"cannot start a registry: {'; '.join(problems)}")
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "data").mkdir(exist_ok=True)
        last = ""
        for _ in range(attempts):
            try:
                return cls._start_once(workdir, free_port(), access_log)
            except RegistryError as e:
                last = str(e)
        raise RegistryError(last)

    @classmethod
    def _start_once(cls, workdir: Path, port: int, access_log: bool) -> Registry:
        config = workdir / "config.yml"
        config.write_text(config_yaml(workdir / "data", port, access_log))
        log = workdir / "registry.log"
        # Environment variables named REGISTRY_* override the config file: never inherit them.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with open(log, "ab") as logf:
            proc = subprocess.Popen(
                [BINARY, "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C in a terminal goes to us, not to it
            )
        reg = cls(workdir, port, proc, log, access_log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                raise RegistryError(f"registry on {reg.address} exited with {proc.returncode}: {tail[0]}")
            if _answers(reg.url):
                return reg
            time.sleep(0.05)
        reg.stop()
        raise RegistryError(f"registry on {reg.address} did not answer GET /v2/ within {START_TIMEOUT:.0f} s")

    def log_offset(self) -> int:
        """Where the log ends now: pass it to `requests` to see only what comes after."""
        return self.log.stat().st_size

    def requests(self, since: int = 0) -> list[Request]:
        """The requests logged after byte `since` of the log (needs `access_log`)."""
        if not self.access_log:
            raise RegistryError(f"registry on {self.address} was started without an access log")
        with open(self.log, "rb") as f:
            f.seek(since)
            return parse_access_log(f.read().decode("utf-8", "replace"))

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Terminate the registry process by its own PID; safe to call more than once."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.registry", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="storage and config directory (default: a temporary one)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    workdir: Path = args.dir or Path(tempfile.mkdtemp(prefix="registry-"))
    try:
        reg = Registry.start(workdir)
    except RegistryError as e:
        print(f"registry: {e}", file=sys.stderr)
        return 1
    with reg:
        print(reg.address, flush=True)
        print(f"serving {reg.url} from {workdir}; Ctrl-C to stop", file=sys.stderr, flush=True)
        while not stop.is_set() and reg.running():
            stop.wait(0.2)
    if args.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
