"""Broken image data from a real registry and a damaged store (issue 12, R3): each case is pushed to the
local docker-registry through its HTTP API (or its stored bytes damaged behind its back), pulled with
`bootc-unified image pull` (podman, into the bootc store) and imported.

podman decides what a pull accepts. What it refuses fails `image pull` with one line naming the
blob, manifest or platform, and the store gains no image. What it accepts is imported exactly as
podman shows it, or, where the image contradicts itself (DiffIDs), refused by the import with one
line and nothing published.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootc_unified.imgstore import STORE_SUBPATH, ImageStore
from harness.loopfs import LoopFs
from harness.registry import Registry
from harness.treecompare import differences, snapshot_dir
from testsupport.cstore_fixtures import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST
from testsupport.hostile import (
    BASE,
    assert_one_line,
    assert_refused,
    directory,
    import_cli,
    init_repo,
    push_blob,
    push_manifest,
    registry_blob_path,
    tar,
)
from testsupport.plugin import run_cli
from testsupport.tarlayer import entry

pytestmark = pytest.mark.storage

LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def top_layer(name: str) -> bytes:
    """A layer of this image alone: the registry stores a blob once for all repositories, and a
    test that damages one must not damage the others' (so no two tests share a layer but BASE)."""
    data = hashlib.sha256(name.encode()).digest() * 200
    return tar(directory("usr"), directory("usr/bin"), entry("usr/bin/app", data, mode=0o755))


@dataclass(frozen=True)
class Pushed:
    ref: str  # registry/name:tag
    manifest_digest: str
    layer_digests: list[str]  # compressed blobs
    config_digest: str


def push_image(
    registry: Registry,
    name: str,
    layers: tuple[bytes, ...] | None = None,
    diff_ids: list[str] | None = None,
    layer_media_type: str = LAYER_GZIP,
    tag: str = "latest",
    architecture: str = "amd64",
) -> Pushed:
    """An OCI image pushed blob by blob (default layers: BASE and top_layer(name)); `diff_ids` default
    to the layers' true ones."""
    name = f"{name}-{secrets.token_hex(4)}"  # fresh per run: a damaged blob stays damaged
    layers = layers or (BASE, top_layer(name))
    blobs = [gzip.compress(t, compresslevel=1, mtime=0) for t in layers]
    digests = [push_blob(registry.url, name, b) for b in blobs]
    config = {
        "architecture": architecture,
        "os": "linux",
        "config": {},
        "rootfs": {
            "type": "layers",
            "diff_ids": diff_ids or ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers],
        },
    }
    config_bytes = json.dumps(config).encode()
    config_digest = push_blob(registry.url, name, config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": [
            {"mediaType": layer_media_type, "digest": d, "size": len(b)}
            for d, b in zip(digests, blobs, strict=True)
        ],
    }
    data = json.dumps(manifest).encode()
    manifest_digest = push_manifest(registry.url, name, tag, data, OCI_MANIFEST)
    return Pushed(f"{registry.address}/{name}:{tag}", manifest_digest, digests, config_digest)


@pytest.fixture
def sysroot(loopfs: LoopFs) -> Iterator[Path]:
    root = loopfs.path / "sysroot"
    root.mkdir()
    yield root
    ImageStore(root / STORE_SUBPATH).cleanup_runtime()


def pull(sysroot: Path, ref: str) -> subprocess.CompletedProcess[str]:
    return run_cli("image", "pull", "--sysroot", sysroot, "--tls-verify", "false", ref, check=False)


def store_images(sysroot: Path) -> list[str]:
    if not (sysroot / STORE_SUBPATH).exists():
        return []
    out = run_cli("image", "list", "--sysroot", sysroot, "--format", "json").stdout
    return sorted(json.dumps(i, sort_keys=True) for i in json.loads(out))


def assert_pull_refused(sysroot: Path, ref: str, *names: str) -> None:
    before = store_images(sysroot)
    proc = pull(sysroot, ref)
    assert_one_line(proc, *names)
    assert store_images(sysroot) == before


def test_manifest_digest_mismatch(registry: Registry, sysroot: Path) -> None:
    """The registry serves, for a digest, bytes that hash to something else (damaged on its disk):
    containers/image refuses when pulling by that digest."""
    img = push_image(registry, "hostile/manifest-digest")
    stored = registry_blob_path(registry.workdir, img.manifest_digest)
    stored.write_bytes(stored.read_bytes().replace(b'"schemaVersion": 2', b'"schemaVersion":  2'))
    by_digest = f"{img.ref.rsplit(':', 1)[0]}@{img.manifest_digest}"
    assert_pull_refused(sysroot, by_digest, img.manifest_digest.split(":")[1][:12])


@pytest.mark.parametrize("damage", ["flipped-byte", "truncated"])
def test_layer_blob_damaged_in_registry(registry: Registry, sysroot: Path, damage: str) -> None:
    """A layer blob whose bytes no longer match its digest (one byte flipped, or cut in half)."""
    img = push_image(registry, f"hostile/blob-{damage}")
    stored = registry_blob_path(registry.workdir, img.layer_digests[1])
    data = bytearray(stored.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2 :]
    else:
        data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    assert_pull_refused(sysroot, img.ref, img.layer_digests[1].split(":")[1][:12])


def test_unknown_layer_media_type(registry: Registry, sysroot: Path, loopfs: LoopFs, tmp_path: Path) -> None:
    """A layer whose media type is no layer type at all: podman pulls it anyway (it detects the
    compression from the bytes), so the import must equal podman's view of it."""
    img = push_image(registry, "hostile/media-type", layer_media_type="application/x-not-a-layer")
    assert pull(sysroot, img.ref).returncode == 0
    assert_imported_as_podman(sysroot, loopfs, img.ref, tmp_path)


def test_manifest_list_without_our_platform(registry: Registry, sysroot: Path) -> None:
    """A manifest list holding only linux/arm64: podman has nothing to pull for linux/amd64."""
    img = push_image(registry, "hostile/arm-only", tag="arm64", architecture="arm64")
    manifest = registry_blob_path(registry.workdir, img.manifest_digest).read_bytes()
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": img.manifest_digest,
                "size": len(manifest),
                "platform": {"architecture": "arm64", "os": "linux"},
            }
        ],
    }
    name = img.ref.split("/", 1)[1].split(":")[0]
    push_manifest(registry.url, name, "latest", json.dumps(index).encode(), OCI_INDEX)
    assert_pull_refused(sysroot, f"{registry.address}/{name}:latest", "amd64")


def test_config_diff_ids_do_not_match_layers(registry: Registry, sysroot: Path, loopfs: LoopFs) -> None:
    """The config's DiffIDs name other tars than the layers: what podman does with that, the import
    must not publish it (one line naming the layer or the config)."""
    wrong = "sha256:" + hashlib.sha256(b"not the layer").hexdigest()
    img = push_image(
        registry, "hostile/diff-ids", diff_ids=["sha256:" + hashlib.sha256(BASE).hexdigest(), wrong]
    )
    proc = pull(sysroot, img.ref)
    if proc.returncode != 0:
        assert_one_line(proc)
        return
    repo = init_repo(loopfs.path / "composefs")
    store = sysroot / STORE_SUBPATH
    assert_refused(import_cli(repo, store, img.ref), repo, wrong.split(":")[1][:12])


# --- a damaged tar-split in the store -------------------------------------------------------------


def rewrite_tar_split(store: Path, ref: str, edit: object) -> Path:
    """Apply `edit(list of JSON entries)` to the top layer's tar-split; returns its path."""
    inspect = json.loads(run_cli("internals", "cstor", "--storage", store, "inspect", ref).stdout)
    path = Path(inspect["layers"][-1]["tar_split_path"])
    entries = [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines() if line.strip()]
    assert callable(edit)
    edit(entries)
    path.write_bytes(gzip.compress(b"".join(json.dumps(e).encode() + b"\n" for e in entries)))
    return path


def _file_entries(entries: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in entries if e["type"] == 1 and int(str(e.get("size", 0))) > 0]


@pytest.mark.parametrize(
    "damage", ["name-climbs-out", "name-is-a-directory", "size-changed", "header-changed"]
)
def test_corrupt_tar_split(registry: Registry, sysroot: Path, loopfs: LoopFs, damage: str) -> None:
    """The store's tar-split edited after the pull: an entry name that climbs out of diff/, one that
    names a directory in diff/, a changed size, a changed header byte. One line naming the layer; nothing
    published."""
    img = push_image(registry, f"hostile/tar-split-{damage}")
    assert pull(sysroot, img.ref).returncode == 0
    store = sysroot / STORE_SUBPATH
    import base64

    def edit(entries: list[dict[str, object]]) -> None:
        [app] = _file_entries(entries)
        if damage == "name-climbs-out":
            app["name"] = "../../../../../../etc/passwd"
            app.pop("name_raw", None)
        elif damage == "name-is-a-directory":
            app["name"] = "usr/bin"  # a directory in diff/: not a regular file
            app.pop("name_raw", None)
        elif damage == "size-changed":
            app["size"] = int(str(app["size"])) - 1
        else:
            seg = next(e for e in entries if e["type"] == 2 and e.get("payload"))
            raw = bytearray(base64.b64decode(str(seg["payload"])))
            raw[0] ^= 0x01
            seg["payload"] = base64.b64encode(bytes(raw)).decode()

    path = rewrite_tar_split(store, img.ref, edit)
    repo = init_repo(loopfs.path / "composefs")
    why = {
        "name-climbs-out": "climbs out",
        "name-is-a-directory": "is a directory",
        "size-changed": "tar-split says",
        "header-changed": "expected the DiffID",
    }[damage]
    assert_refused(import_cli(repo, store, img.ref), repo, "layer sha256:", why)
    assert path.exists()


# --- an image without a kernel, installed --------------------------------------------------------


@pytest.mark.fs("ext4")
def test_install_image_without_kernel(registry: Registry, loopfs: LoopFs) -> None:
    """`install to-filesystem` from a registry image with no /usr/lib/modules/*/vmlinuz: one line
    saying so, nothing written to the target or its ESP."""
    img = push_image(registry, "hostile/no-kernel")
    root, esp = loopfs.path / "root", loopfs.path / "esp"
    root.mkdir()
    esp.mkdir()
    proc = run_cli(
        "install",
        "to-filesystem",
        root,
        "--boot-esp",
        esp,
        "--tls-verify",
        "false",
        "--allow-missing-verity",
        "--source-imgref",
        f"docker://{img.ref}",
        check=False,
    )
    assert_one_line(proc, "has no kernel")
    subprocess.run(["umount", "-R", str(root / STORE_SUBPATH / "overlay")], capture_output=True)
    assert list(root.iterdir()) == [] and list(esp.iterdir()) == []


def assert_imported_as_podman(sysroot: Path, loopfs: LoopFs, ref: str, tmp_path: Path) -> None:
    store = sysroot / STORE_SUBPATH
    repo = init_repo(loopfs.path / "composefs")
    out = json.loads(import_cli(repo, store, ref).stdout)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_cli("internals", "cfs", "--repo", repo, "mount", out["image_id"], mnt)
    try:
        ours = snapshot_dir(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    bootc = ImageStore(store)
    theirs_mnt = Path(bootc.podman(["image", "mount", ref]).stdout.strip())
    try:
        theirs = snapshot_dir(theirs_mnt)
    finally:
        bootc.podman(["image", "unmount", ref])
    ours.records[b"/"] = theirs.records[b"/"]
    assert differences(theirs, ours) == []


def test_as_podman_after_all(registry: Registry, sysroot: Path, loopfs: LoopFs, tmp_path: Path) -> None:
    """The control: an undamaged image pulls and imports as podman shows it."""
    img = push_image(registry, "hostile/control")
    assert pull(sysroot, img.ref).returncode == 0
    assert_imported_as_podman(sysroot, loopfs, img.ref, tmp_path)
