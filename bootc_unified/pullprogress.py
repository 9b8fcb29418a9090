"""Pull into the bootc store with byte progress, through a transient `podman system service`.

What podman 4.3 offers (measured): `podman pull` prints only "Copying blob <digest>" lines when not
on a TTY; the libpod endpoint `POST /libpod/images/pull` streams the same lines (no bytes, no
`pullProgress`). The Docker-compatible endpoint `POST /images/create` streams per-blob events with
the blob's short digest as `id`: "Pulling fs layer", "Downloading" with progressDetail
{current, total} (at most once a second per blob), "Download complete" and "Already exists".
So we take the layer sizes from the manifest (`skopeo inspect --raw`, same pinned environment) and
turn those events into bootc `ProgressBytes`: byte-accurate per finished blob, and in between
whenever podman reports a read. The service listens on a private unix socket in the store's runtime
directory, runs with the store's flags, and is stopped by its own PID. Without skopeo, or when the
service does not come up, `ImageStore.pull_plain` reports per-layer steps instead.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bootc_unified.errors import UserError, tool_error_line
from bootc_unified.libc import libc
from bootc_unified.progress import Progress, ProgressBytes, SubTaskBytes


class ImageStore(Protocol):
    """What a pull needs of imgstore.ImageStore (which calls this module: no import back)."""

    @property
    def state_dir(self) -> Path: ...

    def env(self, insecure: Sequence[str] = ()) -> dict[str, str]: ...

    def argv(self, args: Sequence[str]) -> list[str]: ...

    def pull_plain(self, ref: str, tls_verify: bool, progress: Progress) -> str: ...


SERVICE_START_TIMEOUT = 15.0
ARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}


@dataclass
class Layer:
    digest: str
    size: int
    bytes: int = 0
    cached: bool = False
    done: bool = False

    @property
    def short(self) -> str:
        return self.digest.split(":", 1)[-1][:12]


def registry_host(ref: str) -> str:
    first = ref.removeprefix("docker://").split("/", 1)[0]
    return first


def manifest_layers(store: ImageStore, ref: str, tls_verify: bool) -> list[Layer]:
    """Layer digests and compressed sizes of `ref` for this machine's platform, from the registry."""
    name = ref.removeprefix("docker://")

    def raw(target: str) -> dict[str, Any]:
        argv = [
            "skopeo",
            "inspect",
            "--raw",
            *([] if tls_verify else ["--tls-verify=false"]),  # else registries.conf decides
            f"docker://{target}",
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, env=store.env())
        if proc.returncode != 0:
            raise UserError(f"{ref}: {tool_error_line(proc.stderr)}")
        out: dict[str, Any] = json.loads(proc.stdout)
        return out

    manifest = raw(name)
    if "manifests" in manifest:  # an index: choose this machine's platform
        arch = ARCH.get(platform.machine(), platform.machine())
        for m in manifest["manifests"]:
            p = m.get("platform", {})
            if p.get("os") == "linux" and p.get("architecture") == arch:
                repo = name.split("@", 1)[0]
                last = repo.rsplit("/", 1)[-1]
                if ":" in last:
                    repo = repo.rsplit(":", 1)[0]
                manifest = raw(f"{repo}@{m['digest']}")
                break
        else:
            raise UserError(f"{ref}: no linux/{arch} image in the index")
    return [Layer(str(x["digest"]), int(x.get("size", 0))) for x in manifest.get("layers", [])]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 600) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


# The service exits after this many idle seconds: stop() ends it at once, but when this process
# is killed (SIGKILL, a power-cut test) it must not outlive it for ever (`--time=0` did).
SERVICE_IDLE_EXIT = 30


PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> Callable[[], None]:
    """For the service's process before exec: SIGKILL it when the verb that started it (`parent`)
    dies. A killed upgrade must not leave a podman pulling into the store behind its back (the
    crash tests saw one still writing while the store was copied), nor its mount namespace alive.
    A parent that died before the prctl took effect is seen as a new parent PID: exit then."""
    c = libc()  # loaded here, in the parent: the child only makes the two calls

    def preexec() -> None:
        c.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class Service:
    """`podman system service` for one store on a private socket; stopped by its own PID, and
    killed by the kernel when the process that started it dies."""

    def __init__(self, store: ImageStore, env: dict[str, str]) -> None:
        self.socket = store.state_dir / "api.sock"
        self.socket.unlink(missing_ok=True)
        self.log = store.state_dir / "service.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                store.argv(["system", "service", f"--time={SERVICE_IDLE_EXIT}", f"unix://{self.socket}"]),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with(os.getpid()),
            )
        deadline = time.monotonic() + SERVICE_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OSError(f"podman system service exited with {self.proc.returncode}")
            if self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise OSError("podman system service did not answer")

    def _answers(self) -> bool:
        try:
            conn = UnixHTTPConnection(self.socket, timeout=2)
            conn.request("GET", "/_ping")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def stream(self, method: str, path: str) -> Iterator[dict[str, Any]]:
        conn = UnixHTTPConnection(self.socket)
        conn.request(method, path)
        resp = conn.getresponse()
        decoder = json.JSONDecoder()
        buf = ""
        while chunk := resp.read1(65536):
            buf += chunk.decode("utf-8", errors="replace")
            while True:
                buf = buf.lstrip()
                if not buf:
                    break
                try:
                    obj, end = decoder.raw_decode(buf)
                except json.JSONDecodeError:
                    break
                buf = buf[end:]
                if isinstance(obj, dict):
                    yield obj
        conn.close()
        if resp.status >= 400 and buf.strip():
            yield {"error": buf.strip()}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.socket.unlink(missing_ok=True)


def _event(ref: str, layers: list[Layer]) -> ProgressBytes:
    return ProgressBytes(
        task="pulling",
        description="Pulling",
        id=ref,
        bytes_cached=sum(x.size for x in layers if x.cached),
        bytes=sum(x.bytes for x in layers),
        bytes_total=sum(x.size for x in layers),
        steps_cached=sum(1 for x in layers if x.cached),
        steps=sum(1 for x in layers if x.done),
        steps_total=len(layers),
        subtasks=tuple(
            SubTaskBytes("layer", "Layer", x.digest, x.size if x.cached else 0, x.bytes, x.size)
            for x in layers
        ),
    )


def pull(store: ImageStore, ref: str, tls_verify: bool, progress: Progress) -> str:
    """Pull `ref` into `store`, reporting progress; return a reference that names the pulled image."""
    name = ref.removeprefix("docker://")
    if "://" in name or shutil.which("skopeo") is None:  # another transport, or no skopeo
        return store.pull_plain(ref, tls_verify, progress)
    layers = manifest_layers(store, ref, tls_verify)
    env = store.env(insecure=() if tls_verify else (registry_host(name),))
    try:
        service = Service(store, env)
    except OSError:
        return store.pull_plain(ref, tls_verify, progress)
    by_short = {x.short: x for x in layers}
    last = _event(ref, layers)
    progress.send(last, True)
    try:
        query = urllib.parse.urlencode({"fromImage": name})
        for ev in service.stream("POST", f"/v1.41/images/create?{query}"):
            if "error" in ev:
                message = str(ev.get("error") or ev.get("errorDetail", {}).get("message", "pull failed"))
                raise UserError(f"{ref}: {message.strip().splitlines()[-1]}")
            layer = by_short.get(str(ev.get("id", "")))
            if layer is None:
                continue
            status = str(ev.get("status", ""))
            detail = ev.get("progressDetail") or {}
            if status == "Downloading" and "current" in detail:
                layer.bytes = min(int(detail["current"]), layer.size)
            elif status == "Already exists":
                layer.cached = layer.done = True
                layer.bytes = layer.size
            elif status == "Download complete":
                layer.done = True
                layer.bytes = layer.size
            event = _event(ref, layers)
            if event != last:
                progress.send(event, status != "Downloading")
                last = event
    finally:
        service.stop()
    # The pull succeeded: blobs podman did not report on (none, so far) are in the store as well.
    for layer in layers:
        if not layer.done:
            layer.done, layer.bytes = True, layer.size
    if (event := _event(ref, layers)) != last:
        progress.send(event, True)
    return name
