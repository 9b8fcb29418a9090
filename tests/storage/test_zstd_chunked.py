"""zstd:chunked through the bootc store on this host (Debian 12: podman 4.3, containers-storage 1.43,
buildah 1.28, skopeo 1.9). The trixie guest's side (podman 5.4) is tests/vm/test_zstd_chunked_vm.py.

What holds here, each against an oracle that is not this project's code:
- host podman pulls zstd:chunked (its first format: a TOC, no tar-split) partially when its
  storage.conf says `enable_partial_images = "true"`: the registry's access log shows range reads
  and, for the update v1 -> v2 (harness.chunked), about the new files' bytes instead of the layer;
- the layer it stores has no tar-split and records the *compressed* digest as its diff-digest
  (podman's own `image inspect` names the config's DiffID), so the import refuses it in one line
  naming the layer, its tar-split and its DiffID, and writes nothing;
- so the bootc store enables partial pulls only where podman keeps both (>= 5.3, probed from
  `podman version`); with its own configuration this host pulls the same image whole (the whole
  layer fetched, a layer record with a tar-split) and imports it bit-exactly (sha256 of each layer
  stream = podman's DiffID) and zero-copy (harness.zerocopy_audit: st_nlink on ext4, FIEMAP on
  btrfs/XFS);
- layer records as newer containers-storage writes them for a partial pull (`toc-digest`, a
  diff-digest, a tar-split) import; without the diff-digest or the tar-split they are refused,
  naming what is missing (records edited in a copy of a real store).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootc_unified.cstorage import PartialLayerError, Store
from bootc_unified.imgstore import PARTIAL_PULLS_SINCE, ImageStore, podman_version
from bootc_unified.importer import import_image, layer_content_id
from bootc_unified.repository import Repository, splitstream
from harness import chunked
from harness.loopfs import LoopFs
from harness.pytest_plugin import require
from harness.registry import Registry
from harness.registry import missing_prerequisites as registry_missing
from harness.run import run
from harness.testimages import missing_prerequisites as images_missing
from harness.zerocopy_audit import audit
from testsupport.plugin import run_cli

pytestmark = pytest.mark.storage

ZC = chunked.ZSTD_CHUNKED
# What a partial pull reads besides the new files' contents: the TOC (a few KiB for ~50 files), the
# config, chunk framing. Measured: 8-9 KiB; a whole layer is ~4.8 MB, so this cannot hide one.
PARTIAL_OVERHEAD = 64 << 10


@pytest.fixture(scope="module")
def logged_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry of this module's own, with an access log: bytes served are the oracle."""
    require(registry_missing(), "a local registry")
    with Registry.start(tmp_path_factory.mktemp("registry"), access_log=True) as reg:
        yield reg


@pytest.fixture(scope="module")
def updates(logged_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> chunked.UpdateImages:
    require(images_missing(), "building the update images")
    return chunked.build_and_push(logged_registry.address, tmp_path_factory.mktemp("updates"), ("gzip", ZC))


def pull_measured(store: ImageStore, registry: Registry, ref: str) -> chunked.Fetched:
    offset = registry.log_offset()
    store.pull(ref, tls_verify=False)
    return chunked.fetched(registry, offset)


def podman_diff_ids(store: ImageStore, ref: str) -> list[str]:
    return list(json.loads(store.podman(["image", "inspect", ref]).stdout)[0]["RootFS"]["Layers"])


def tree_files(root: Path) -> dict[bytes, str]:
    """sha256 of every regular file under `root`, by path relative to it."""
    found = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                found[os.fsencode(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def expected_files(updates: chunked.UpdateImages, name: str) -> dict[bytes, str]:
    return {p: e.sha256 for p, e in updates.expected[name].items() if e.type == "file"}


def repo_listing(repo: Repository) -> list[str]:
    return sorted(str(p.relative_to(repo.path)) for p in repo.path.rglob("*"))


def test_partial_pulls_where_podman_supports_them(bootc_store: ImageStore) -> None:
    """The probe reads `podman --version`; podman's own JSON says the same; storage.conf follows."""
    client = json.loads(run(["podman", "version", "--format", "json"]).stdout)["Client"]["Version"]
    major, minor = (int(x) for x in client.split(".")[:2])
    assert podman_version() == (major, minor)
    enabled = (major, minor) >= PARTIAL_PULLS_SINCE
    assert bootc_store.pulls_partially is enabled
    conf = Path(bootc_store.env()["CONTAINERS_STORAGE_CONF"]).read_text()
    assert f'enable_partial_images = "{str(enabled).lower()}"' in conf
    assert 'use_hard_links = "false"' in conf
    forced = dataclasses.replace(bootc_store, partial_pulls=True)
    assert 'enable_partial_images = "true"' in forced.storage_conf_text()


def test_partial_pull_fetches_new_files_and_import_refuses_it(
    sysroot: Path, logged_registry: Registry, updates: chunked.UpdateImages, loopfs: LoopFs
) -> None:
    if (podman_version() or (0, 0)) >= PARTIAL_PULLS_SINCE:
        pytest.skip("this podman keeps a tar-split and DiffID for partial layers (see the VM test)")
    # Partial pulls forced on, as a storage.conf enabling them would on this podman.
    store = dataclasses.replace(ImageStore.ensure(sysroot), partial_pulls=True)
    v1, v2 = updates.ref("upd-v1", ZC), updates.ref("upd-v2", ZC)
    first = pull_measured(store, logged_registry, v1)
    update = pull_measured(store, logged_registry, v2)
    layer_size = updates.layer_sizes[("upd-v2", ZC)]
    print(f"partial pull v1 {first.to_json()}, v1 -> v2 {update.to_json()}, v2 layer {layer_size} bytes")
    assert update.range_requests >= 1
    assert chunked.new_content_bytes() <= update.blob_bytes <= chunked.new_content_bytes() + PARTIAL_OVERHEAD
    assert update.blob_bytes < layer_size // 10

    # podman assembled the right files (v1's reused, the new ones fetched): the definitions say so.
    image = Store.open(store.root).image(v2)
    [layer] = image.layers
    assert tree_files(layer.diff_path) == expected_files(updates, "upd-v2")

    # The store's record: a partial layer, no tar-split, diff-digest = the compressed digest.
    assert layer.record.partial
    assert not layer.tar_split_path.exists()
    [diff_id] = podman_diff_ids(store, v2)
    assert layer.diff_id == diff_id != layer.record.diff_digest

    repo = Repository.init(loopfs.path / "composefs", insecure=True)
    before = repo_listing(repo)
    with pytest.raises(PartialLayerError) as err:
        import_image(repo, Store.open(store.root), v2, zerocopy=True)
    message = str(err.value)
    assert "\n" not in message and diff_id in message, message
    assert "its tar-split" in message and "its DiffID" in message, message
    assert repo_listing(repo) == before

    proc = run_cli(
        "internals",
        "cfs",
        "--repo",
        repo.path,
        "import",
        "--zerocopy",
        "--storage",
        store.root,
        v2,
        check=False,
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert diff_id in proc.stderr and "tar-split" in proc.stderr and "Traceback" not in proc.stderr
    assert repo_listing(repo) == before
    proc = run_cli("internals", "cstor", "--storage", store.root, "layer-tar", v2, diff_id, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "tar-split" in proc.stderr
    inspect = json.loads(run_cli("internals", "cstor", "--storage", store.root, "inspect", v2).stdout)
    assert inspect["layers"][0]["partial"] is True and len(inspect["layers"][0]["partial_gaps"]) == 2


def test_store_pulls_zstd_chunked_whole_here_and_imports_it_zero_copy(
    bootc_store: ImageStore, logged_registry: Registry, updates: chunked.UpdateImages, loopfs: LoopFs
) -> None:
    if bootc_store.pulls_partially:
        pytest.skip("this podman pulls partially (see the VM test)")
    v1, v2 = updates.ref("upd-v1", ZC), updates.ref("upd-v2", ZC)
    pull_measured(bootc_store, logged_registry, v1)
    update = pull_measured(bootc_store, logged_registry, v2)
    layer_size = updates.layer_sizes[("upd-v2", ZC)]
    # (podman 4.3 still reads the TOC with one range request before it pulls the layer whole)
    assert update.blob_bytes >= layer_size, update

    repo = Repository.init(loopfs.path / "composefs", insecure=True)
    cstore = Store.open(bootc_store.root)
    for ref in (v1, v2):
        result = import_image(repo, cstore, ref, zerocopy=True)
        assert result.stats.to_json()["copied"] == {"objects": 0, "bytes": 0}
        for layer, diff_id in zip(cstore.image(ref).layers, podman_diff_ids(bootc_store, ref), strict=True):
            assert not layer.record.partial and layer.tar_split_path.is_file() and layer.diff_id == diff_id
            stream = repo.open_stream(layer_content_id(diff_id), splitstream.OCI_LAYER)
            assert "sha256:" + hashlib.sha256(b"".join(repo.cat_stream(stream))).hexdigest() == diff_id
    found = audit(repo.path, bootc_store.root)
    assert found.unaccounted == {}
    shared = found.hardlinked if loopfs.kind == "ext4" else found.reflinked
    # every file content (48 + 2 + 1 distinct ones of 96 KiB; the 32-byte version files are inline)
    assert len(shared) == chunked.FILES + chunked.CHANGED + chunked.ADDED, found


GAP_CASES = {
    "complete": None,  # toc-digest, diff-digest and tar-split: what podman >= 5.3 keeps
    "no-diff-digest": "its DiffID (no diff-digest recorded)",
    "no-tar-split": "its tar-split",
}


@pytest.mark.fs("ext4")
@pytest.mark.parametrize("case", GAP_CASES)
def test_partial_layer_records(
    case: str,
    bootc_store: ImageStore,
    logged_registry: Registry,
    updates: chunked.UpdateImages,
    loopfs: LoopFs,
) -> None:
    """A layer record marked as pulled by TOC (`toc-digest`, as containers-storage >= 1.5x writes
    it), in a copy of a store that pulled the image whole: complete, it imports bit-exactly; with
    its diff-digest or its tar-split gone, the import names the gap in one line and writes nothing."""
    ref = updates.ref("upd-v1", "gzip")
    bootc_store.pull(ref, tls_verify=False)
    bootc_store.cleanup_runtime()
    [diff_id] = podman_diff_ids(bootc_store, ref)
    root = loopfs.path / "edited"
    shutil.copytree(bootc_store.root, root, symlinks=True)
    layers_json = root / "overlay-layers" / "layers.json"
    records = json.loads(layers_json.read_text())
    [record] = [r for r in records if r.get("diff-digest") == diff_id]
    record["toc-digest"] = "sha256:" + hashlib.sha256(b"a TOC").hexdigest()
    if case == "no-diff-digest":
        del record["diff-digest"]
    if case == "no-tar-split":
        (root / "overlay-layers" / f"{record['id']}.tar-split.gz").unlink()
    layers_json.write_text(json.dumps(records))

    repo = Repository.init(loopfs.path / "composefs", insecure=True)
    before = repo_listing(repo)
    proc = run_cli(
        "internals", "cfs", "--repo", repo.path, "import", "--zerocopy", "--storage", root, ref, check=False
    )
    expected = GAP_CASES[case]
    if expected is None:
        assert proc.returncode == 0, proc.stderr
        stream = repo.open_stream(layer_content_id(diff_id), splitstream.OCI_LAYER)
        assert "sha256:" + hashlib.sha256(b"".join(repo.cat_stream(stream))).hexdigest() == diff_id
        return
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert diff_id in proc.stderr and expected in proc.stderr and "zstd:chunked" in proc.stderr, proc.stderr
    assert repo_listing(repo) == before
