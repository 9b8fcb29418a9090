"""The harness's local registry: loopback only, answers /v2/, stores pushes, stops by its own PID."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from harness.pytest_plugin import require
from harness.registry import Registry, missing_prerequisites
from harness.run import run

pytestmark = pytest.mark.storage


def listening_addresses(pid: int) -> list[str]:
    """Local addresses of TCP listeners owned by `pid`, from `ss` (an independent oracle)."""
    out = run(["ss", "-Hltnp"]).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def test_registry_answers_on_loopback_only(tmp_path: Path) -> None:
    require(missing_prerequisites(), "a local registry")
    with Registry.start(tmp_path) as reg:
        assert reg.address == f"127.0.0.1:{reg.port}"
        assert reg.url == f"http://127.0.0.1:{reg.port}"
        with urllib.request.urlopen(f"{reg.url}/v2/", timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
        assert listening_addresses(reg.process.pid) == [reg.address]
        pid = reg.process.pid
    assert not reg.running()
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", reg.port)) != 0
    reg.stop()  # idempotent


def test_two_registries_side_by_side(tmp_path: Path) -> None:
    require(missing_prerequisites(), "a local registry")
    with Registry.start(tmp_path / "a") as a, Registry.start(tmp_path / "b") as b:
        assert a.port != b.port
        assert a.process.pid != b.process.pid


def test_push_lands_in_the_registry_storage(registry: Registry, tmp_path: Path) -> None:
    """skopeo copies a one-file OCI layout in; the catalog and the storage directory show it."""
    layout = tmp_path / "layout"
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hello\n")
    ref = f"{registry.address}/harness/pushcheck:v1"
    run(["tar", "-C", src, "-cf", tmp_path / "layer.tar", "hello"])
    _write_oci_layout(layout, tmp_path / "layer.tar")
    run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{ref}"])
    with urllib.request.urlopen(f"{registry.url}/v2/_catalog", timeout=5) as resp:
        assert "harness/pushcheck" in json.load(resp)["repositories"]
    with urllib.request.urlopen(f"{registry.url}/v2/harness/pushcheck/tags/list", timeout=5) as resp:
        assert json.load(resp)["tags"] == ["v1"]
    repo_dir = registry.workdir / "data" / "docker/registry/v2/repositories/harness/pushcheck"
    assert (repo_dir / "_manifests/tags/v1").is_dir()


def test_cli_prints_address_and_stops_on_interrupt(tmp_path: Path) -> None:
    require(missing_prerequisites(), "a local registry")
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.registry", "--dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        host, port = address.split(":")
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://{address}/v2/", timeout=5) as resp:
            assert resp.status == 200
        proc.send_signal(2)  # SIGINT, like Ctrl-C
        assert proc.wait(20) == 0
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", int(port))) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _write_oci_layout(layout: Path, layer_tar: Path) -> None:
    import hashlib

    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)

    layer, layer_size = blob(layer_tar.read_bytes())
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer]},
    }
    cfg, cfg_size = blob(json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": cfg_size},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_size}
        ],
    }
    man, man_size = blob(json.dumps(manifest).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": man,
                "size": man_size,
                "annotations": {"org.opencontainers.image.ref.name": "v1"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
