"""The harness's local registry: loopback only, answers /v2/, stores pushes, stops by its own PID."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest

from harness.pytest_plugin import require
from harness.registry import Registry, missing_prerequisites
from harness.run import run
from harness.scratchpodman import ScratchPodman
from harness.testimages import Expected, TestImages, fetch_manifest
from harness.treewalk import read_xattrs


def run_bytes(argv: list[str], data: bytes) -> bytes:
    return subprocess.run(argv, input=data, capture_output=True, check=True).stdout


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
        assert proc.wait(60) == 0  # the registry gets STOP_TIMEOUT to drain, then a kill; slow under load
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


# --- the test images, checked against their definitions through an independent reader ---------


def _walk(root: Path) -> dict[bytes, os.stat_result]:
    out = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, broot)] = os.lstat(full)
    return out


TYPES = {
    "file": stat.S_ISREG,
    "dir": stat.S_ISDIR,
    "symlink": stat.S_ISLNK,
    "fifo": stat.S_ISFIFO,
    "chardev": stat.S_ISCHR,
}


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_images_match_their_definitions(test_images: TestImages, compression: str, tmp_path: Path) -> None:
    """Pull each image with plain podman into a scratch store, mount it, compare with the oracle."""
    store = ScratchPodman(tmp_path)
    try:
        for image in test_images.images.values():
            store("pull", "-q", "--tls-verify=false", image.refs[compression])
            mount = Path(store("image", "mount", image.refs[compression]))
            try:
                _compare_tree(mount, image.expected)
            finally:
                store("image", "unmount", image.refs[compression])
    finally:
        store.close()


def _compare_tree(mount: Path, expected: dict[bytes, Expected]) -> None:
    seen = _walk(mount)
    assert sorted(seen) == sorted(expected)
    inodes: dict[int, int] = {}
    for rel, want in expected.items():
        st = seen[rel]
        full = os.path.join(os.fsencode(mount), rel)
        where = rel.decode(errors="replace")
        assert TYPES[want.type](st.st_mode), where
        assert stat.S_IMODE(st.st_mode) == want.mode or want.type == "symlink", where
        assert (st.st_uid, st.st_gid) == (want.uid, want.gid), where
        if want.type == "file":
            assert hashlib.sha256(Path(os.fsdecode(full)).read_bytes()).hexdigest() == want.sha256, where
        if want.type == "symlink":
            assert os.readlink(full) == want.target, where
        if want.type == "chardev":
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == want.rdev, where
        if want.type != "symlink":
            got = {
                os.fsdecode(n): v
                for n, v in read_xattrs(full).items()
                if n.startswith((b"user.", b"security.capability"))
            }
            assert got == want.xattrs, where
        if want.inode:
            # entries sharing an expected inode share a real one, and only those
            assert inodes.setdefault(want.inode, st.st_ino) == st.st_ino, where
    assert len(set(inodes.values())) == len(inodes)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_pushed_layers_carry_the_tar_features(test_images: TestImages, compression: str) -> None:
    """Read the layer blobs straight from the registry: PAX names, whiteouts, opaque marker, xattrs."""
    image = test_images["features"]
    manifest = fetch_manifest(
        test_images.registry_address, f"bootc-unified-test/features-{compression}", "latest"
    )
    layers = manifest["layers"]
    assert isinstance(layers, list) and len(layers) == image.layers
    members = []
    for layer in layers:
        assert layer["mediaType"] == f"application/vnd.oci.image.layer.v1.tar+{compression}"
        url = f"http://{test_images.registry_address}/v2/bootc-unified-test/features-{compression}/blobs/{layer['digest']}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            blob = resp.read()
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"]
        raw = gzip.decompress(blob) if compression == "gzip" else run_bytes(["zstd", "-dc"], blob)
        with tarfile.open(fileobj=io.BytesIO(raw), encoding="utf-8", errors="surrogateescape") as tar:
            members.append({os.fsencode(m.name): m for m in tar.getmembers()})
    first, second = members
    long_name = [n for n in first if len(n) > 100]
    assert long_name and "path" in first[long_name[0]].pax_headers
    assert b"nonutf8/caf\xe9-latin1" in first
    assert (
        first[b"hardlinks/b"].islnk() and first[b"special/null"].ischr() and first[b"special/fifo"].isfifo()
    )
    assert first[b"special/setuid"].mode & stat.S_ISUID
    assert first[b"xattrs/user"].pax_headers["SCHILY.xattr.user.bootc-test"] == "hello"
    assert "SCHILY.xattr.security.capability" in first[b"xattrs/capability"].pax_headers
    assert b"later/.wh.deleted" in second
    assert b"later/opaque/.wh..wh..opq" in second
    assert (stat.S_IMODE(second[b"later/chmod"].mode), second[b"later/chmod"].uid) == (0o600, 1000)
