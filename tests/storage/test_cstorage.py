"""The read-only containers-storage reader on real stores written by skopeo/podman (containers/storage).

Oracles: the DiffIDs computed by this test from tars it wrote itself (and, for the image containers/storage
produced with buildah, the config's rootfs.diff_ids), podman's own `image inspect` view, and the exact tar
bytes handed to skopeo. Stores are private (--root/--runroot), on loop btrfs/XFS/ext4 or in tmp.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootc_unified.cstorage import Image, Store, reassemble
from bootc_unified.cstorage.reference import ImageNotFound
from bootc_unified.cstorage.walk import LayerEntry, walk_layer
from bootc_unified.errors import UserError
from harness.loopfs import LoopFs
from harness.pytest_plugin import require
from harness.run import run
from harness.testimages import TestImages
from testsupport.cstore_fixtures import (
    OCI_MANIFEST,
    BuiltImage,
    StoreDirs,
    add_index,
    buildah_tree_image,
    copy_into_store,
    edge_case_images,
    make_store_dirs,
    release_store,
    write_oci_layout,
)
from testsupport.proclocks import LockWatch, wait_until_blocked

pytestmark = pytest.mark.storage

BIG_SRC = Path(f"/usr/lib/python3.{sys.version_info.minor}")


def _missing() -> list[str]:
    problems = [] if os.geteuid() == 0 else ["root"]
    problems += [f"{t} not found" for t in ("podman", "buildah", "skopeo") if shutil.which(t) is None]
    if not BIG_SRC.is_dir():
        problems.append(f"{BIG_SRC} (the larger image's content)")
    return problems


@dataclass(frozen=True)
class Layouts:
    crafted: Path  # OCI layout with the hand-made images (edge, shared)
    crafted_images: tuple[BuiltImage, ...]
    big: Path  # OCI layout with `big`: one layer containers/storage produced from /usr/lib/python3.X
    small: Path  # same, from its json/ package: quick to copy


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> Layouts:
    require(_missing(), "containers-storage tests")
    work = tmp_path_factory.mktemp("cstor-layouts")
    images = edge_case_images()
    write_oci_layout(work / "crafted", images)
    buildah_tree_image(BIG_SRC, str(BIG_SRC), work / "buildah-store", work / "big", "big")
    buildah_tree_image(
        BIG_SRC / "json", str(BIG_SRC / "json"), work / "buildah-store", work / "small", "small"
    )
    shutil.rmtree(work / "buildah-store" / "root", ignore_errors=True)
    return Layouts(work / "crafted", tuple(images), work / "big", work / "small")


def fill_store(store: StoreDirs, layouts: Layouts, *, big: bool) -> None:
    for image in layouts.crafted_images:
        copy_into_store(layouts.crafted, image.tag, store, f"localhost/{image.tag}:latest")
    copy_into_store(layouts.small, "small", store, "localhost/small:latest")
    if big:
        copy_into_store(layouts.big, "big", store, "localhost/big:latest")


def podman_diff_ids(store: StoreDirs, name: str) -> list[str]:
    out = run(store.podman("image", "inspect", "--format", "json", name), env=store.env).stdout
    layers: list[str] = json.loads(out)[0]["RootFS"]["Layers"]
    return layers


def cli(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "bootc_unified", *map(str, args)], capture_output=True)


def check_image(store: Store, name: str, expected: BuiltImage | None, podman_view: list[str]) -> Image:
    image = store.image(name)
    diff_ids = [layer.diff_id for layer in image.layers]
    assert diff_ids == podman_view
    assert diff_ids == image.config["rootfs"]["diff_ids"]
    if expected is not None:
        assert diff_ids == expected.diff_ids
    with store.read_lock():
        for i, layer in enumerate(image.layers):
            out = io.BytesIO() if expected is not None else None
            result = reassemble(layer, out)  # raises unless sha256 == DiffID
            assert result.digest == layer.diff_id
            assert result.size == layer.size
            if expected is not None:
                assert out is not None and out.getvalue() == expected.layers[i]
            entries = list(walk_layer(layer))  # raises unless the walked stream hashes to the DiffID
            if expected is not None:
                check_walk(entries, expected.layers[i])
    return image


def check_walk(entries: list[LayerEntry], tar: bytes) -> None:
    """The walk agrees with Python's tarfile reading the original tar, and finds the whiteouts."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:", errors="surrogateescape") as tf:
        members = tf.getmembers()
    assert len(entries) == len(members)
    for entry, m in zip(entries, members, strict=True):
        h = entry.header
        assert h.name.rstrip(b"/") == m.name.encode("utf-8", "surrogateescape")
        assert (h.typeflag, h.mode, h.uid, h.gid, h.size) == (m.type, m.mode, m.uid, m.gid, m.size)
        assert h.linkname == m.linkname.encode("utf-8", "surrogateescape")
        assert (h.devmajor, h.devminor) == (m.devmajor, m.devminor)
        xattrs = {
            k[13:]: v.encode("utf-8", "surrogateescape")
            for k, v in m.pax_headers.items()
            if k[:13] == "SCHILY.xattr."
        }
        assert h.xattrs == xattrs
        if m.isreg() and m.size:
            assert entry.content is not None and Path(os.fsdecode(entry.content)).stat().st_size == m.size
        else:
            assert entry.content is None
    whiteouts = {e.path for e in entries if e.whiteout}
    opaque = {e.path for e in entries if e.opaque}
    if any(m.name.startswith(".wh.") for m in members):
        assert whiteouts == {b"gone", b"gone-dir", b"data/f0"} and opaque == {b"opaque"}
    else:
        assert not whiteouts and not opaque


# --- every layer of every image, on each filesystem -------------------------------------------


def test_every_layer_reassembles_to_its_diff_id(
    fs_kind: str, loopfs: LoopFs, layouts: Layouts, request: pytest.FixtureRequest
) -> None:
    dirs = make_store_dirs(loopfs.path / "storage")
    request.addfinalizer(lambda: release_store(dirs))
    fill_store(dirs, layouts, big=True)
    store = Store.open(dirs.root)
    for built in layouts.crafted_images:
        name = f"localhost/{built.tag}:latest"
        check_image(store, name, built, podman_diff_ids(dirs, name))
    check_image(store, "localhost/small:latest", None, podman_diff_ids(dirs, "localhost/small:latest"))
    big = check_image(store, "localhost/big:latest", None, podman_diff_ids(dirs, "localhost/big:latest"))
    assert big.layers[0].size is not None and big.layers[0].size > 30 << 20

    # The CLI streams the same bytes.
    layer = big.layers[0]
    proc = cli("internals", "cstor", "--storage", dirs.root, "layer-tar", "big", layer.diff_id)
    assert proc.returncode == 0, proc.stderr
    assert "sha256:" + hashlib.sha256(proc.stdout).hexdigest() == layer.diff_id
    proc = cli("internals", "cstor", "--storage", dirs.root, "inspect", "localhost/edge:latest")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    edge = layouts.crafted_images[0]
    assert [lay["diff_id"] for lay in info["layers"]] == edge.diff_ids
    assert info["config"]["rootfs"]["diff_ids"] == edge.diff_ids
    assert all(
        Path(lay["diff_path"]).is_dir() and Path(lay["tar_split_path"]).is_file() for lay in info["layers"]
    )


def test_project_test_images_from_the_registry(
    fs_kind: str, loopfs: LoopFs, test_images: TestImages, request: pytest.FixtureRequest
) -> None:
    """Every layer of every image of images/testimages/, as podman pulls them (gzip and zstd)."""
    dirs = make_store_dirs(loopfs.path / "storage")
    request.addfinalizer(lambda: release_store(dirs))
    checked = 0
    for pushed in test_images.images.values():
        for compression, ref in pushed.refs.items():
            run(dirs.podman("pull", "-q", "--tls-verify=false", ref), env=dirs.env, timeout=600)
            image = check_image(Store.open(dirs.root), ref, None, podman_diff_ids(dirs, ref))
            digest = pushed.digests[compression]
            assert digest in image.record.all_digests
            assert Store.open(dirs.root).image(f"{ref.rsplit(':', 1)[0]}@{digest}").id == image.id
            assert len(image.layers) == pushed.layers
            checked += len(image.layers)
    assert checked > 0


# --- a store in tmp for references, bad input and concurrency ---------------------------------


@pytest.fixture(scope="module")
def base_store(layouts: Layouts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreDirs]:
    dirs = make_store_dirs(tmp_path_factory.mktemp("cstor-base"))
    fill_store(dirs, layouts, big=False)
    copy_into_store(layouts.crafted, "edge", dirs, "example.com/org/edge:v1")
    copy_into_store(layouts.crafted, "edge", dirs, "quay.io/a/thing:latest")
    copy_into_store(layouts.crafted, "shared", dirs, "quay.io/b/thing:latest")
    yield dirs
    release_store(dirs)


def test_image_references(base_store: StoreDirs, layouts: Layouts) -> None:
    store = Store.open(base_store.root)
    edge = store.image("localhost/edge:latest")
    assert edge.digest is not None and edge.digest.startswith("sha256:")
    forms = [
        "edge",
        "edge:latest",
        "localhost/edge",
        "org/edge:v1",
        "example.com/org/edge:v1",
        edge.id,
        edge.id[:12],
        "sha256:" + edge.id,
        edge.digest,
        f"localhost/edge@{edge.digest}",
        f"edge@{edge.digest}",
        "quay.io/a/thing",
    ]
    for ref in forms:
        assert store.image(ref).id == edge.id, ref
    # The config is found through the manifest, and here it is the image ID.
    assert edge.config_digest == "sha256:" + edge.id
    for ref, message in [
        ("nope", "image 'nope' not found"),
        ("localhost/edge:other", "not found"),
        ("example.com/edge", "not found"),
        ("thing", "ambiguous"),
        ("sha256:" + "0" * 64, "not found"),
    ]:
        with pytest.raises(ImageNotFound, match=message):
            store.image(ref)


def test_image_pulled_through_a_manifest_list(
    layouts: Layouts, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    layout = tmp_path / "layout"
    shutil.copytree(layouts.crafted, layout)
    list_digest = add_index(layout, "shared", "multi")
    dirs = make_store_dirs(tmp_path / "store")
    request.addfinalizer(lambda: release_store(dirs))
    copy_into_store(layout, "multi", dirs, "localhost/multi:latest")
    store = Store.open(dirs.root)
    image = store.image("localhost/multi:latest")
    assert image.manifest_digest != list_digest and image.manifest["mediaType"] == OCI_MANIFEST
    assert store.image(list_digest).id == store.image(image.manifest_digest).id == image.id
    shared = layouts.crafted_images[1]
    assert [layer.diff_id for layer in image.layers] == shared.diff_ids
    with store.read_lock():
        for layer in image.layers:
            reassemble(layer)


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path under the store with type/mode, size, mtime and (for files) content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            digest = (
                hashlib.sha256(path.read_bytes()).hexdigest()
                if path.is_file() and not path.is_symlink()
                else ""
            )
            out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def _layer(root: Path, name: str, index: int) -> tuple[str, str]:
    image = Store.open(root).image(name)
    return image.layers[index].id, image.layers[index].diff_id


def _rewrite_gzip_line(path: Path, pick: str, old: bytes, new: bytes) -> None:
    import gzip

    lines = gzip.decompress(path.read_bytes()).split(b"\n")
    for i, line in enumerate(lines):
        if pick.encode() in line and old in line:
            lines[i] = line.replace(old, new, 1)
            break
    else:
        raise AssertionError(f"no line with {pick}")
    path.write_bytes(gzip.compress(b"\n".join(lines)))


def _corrupt(case: str, root: Path) -> tuple[list[str], str]:
    """Damage the store copy at `root`; return the CLI args to run and the expected error text."""
    layers_dir = root / "overlay-layers"
    if case == "unknown-image":
        return ["inspect", "no/such:image"], "image 'no/such:image' not found"
    if case == "unknown-diffid":
        return ["layer-tar", "edge", "sha256:" + "1" * 64], "no layer with DiffID sha256:1111"
    if case == "layers-json-not-json":
        (layers_dir / "layers.json").write_text('[{"id": "abc", ')
        return ["inspect", "edge"], "layers.json: not valid JSON"
    if case == "images-json-not-json":
        (root / "overlay-images" / "images.json").write_text("nonsense")
        return ["inspect", "edge"], "images.json: not valid JSON"
    top_id, top_diff = _layer(root, "edge", 1)
    base_id, base_diff = _layer(root, "edge", 0)
    if case == "missing-layer":
        records = json.loads((layers_dir / "layers.json").read_text())
        (layers_dir / "layers.json").write_text(json.dumps([r for r in records if r["id"] != top_id]))
        return ["inspect", "edge"], f"layer {top_id} is missing from layers.json"
    if case == "missing-diff-file":
        (root / "overlay" / base_id / "diff" / "data" / "f4096").unlink()
        return ["layer-tar", "edge", base_diff], "diff file"
    if case == "missing-tar-split":
        (layers_dir / f"{top_id}.tar-split.gz").unlink()
        return ["layer-tar", "edge", top_diff], "tar-split"
    if case == "bad-base64":
        _rewrite_gzip_line(
            layers_dir / f"{base_id}.tar-split.gz", '"type":1', b'"payload":"', b'"payload":"*'
        )
        return ["layer-tar", "edge", base_diff], "not valid base64"
    if case == "crc-mismatch":
        path = root / "overlay" / base_id / "diff" / "data" / "f4096"
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))
        return ["layer-tar", "edge", base_diff], "CRC-64 of diff file"
    if case == "truncated-gzip":
        path = layers_dir / f"{base_id}.tar-split.gz"
        path.write_bytes(path.read_bytes()[:-200])
        return ["layer-tar", "edge", base_diff], "truncated gzip"
    if case == "digest-mismatch":
        # A header byte changed in a segment: CRCs still match, only the DiffID check can tell.
        import base64
        import gzip

        path = layers_dir / f"{top_id}.tar-split.gz"
        lines = gzip.decompress(path.read_bytes()).split(b"\n")
        obj = json.loads(lines[0])
        raw = bytearray(base64.b64decode(obj["payload"]))
        raw[110] ^= 1  # inside the first header's uid field
        obj["payload"] = base64.b64encode(bytes(raw)).decode()
        lines[0] = json.dumps(obj).encode()
        path.write_bytes(gzip.compress(b"\n".join(lines)))
        return ["layer-tar", "edge", top_diff], "expected the DiffID"
    raise AssertionError(case)


BAD_CASES = [
    "unknown-image",
    "unknown-diffid",
    "layers-json-not-json",
    "images-json-not-json",
    "missing-layer",
    "missing-diff-file",
    "missing-tar-split",
    "bad-base64",
    "crc-mismatch",
    "truncated-gzip",
    "digest-mismatch",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_line_error_and_store_untouched(
    case: str, base_store: StoreDirs, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    run(["cp", "-a", base_store.root, root])
    args, expected = _corrupt(case, root)
    before = snapshot(root)
    proc = cli("internals", "cstor", "--storage", root, *args)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.count("\n") == 1 and err.startswith("bootc-unified: error: "), err
    assert expected in err, err
    assert "Traceback" not in err
    assert snapshot(root) == before


def test_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such containers-storage"):
        Store.open(tmp_path / "absent")
    with pytest.raises(UserError, match="not an overlay containers-storage"):
        Store.open(tmp_path)


# --- concurrency ------------------------------------------------------------------------------


def store_lock_files(store: StoreDirs) -> list[Path]:
    """The lock files containers/storage guards layers.json and images.json with."""
    return [store.root / "overlay-layers" / "layers.lock", store.root / "overlay-images" / "images.lock"]


@pytest.fixture
def store_copy(base_store: StoreDirs, tmp_path: Path) -> Iterator[StoreDirs]:
    dirs = make_store_dirs(tmp_path / "s")
    shutil.rmtree(dirs.root, ignore_errors=True)
    run(["cp", "-a", base_store.root, dirs.root])
    yield dirs
    release_store(dirs)


def test_read_lock_holds_off_podman_writers(store_copy: StoreDirs) -> None:
    store = Store.open(store_copy.root)
    with store.read_lock():
        before = (store_copy.root / "overlay-images" / "images.json").read_bytes()
        proc = subprocess.Popen(
            store_copy.podman("tag", "localhost/edge:latest", "localhost/edge:tagged"), env=store_copy.env
        )
        # the kernel's lock table shows podman waiting for a write lock on a lock file we hold
        waiting = wait_until_blocked(proc, store_lock_files(store_copy), timeout=60)
        assert waiting.kind == "POSIX" and waiting.mode == "WRITE", waiting
        assert proc.poll() is None
        assert (store_copy.root / "overlay-images" / "images.json").read_bytes() == before
        with pytest.raises(ImageNotFound):
            store.image("localhost/edge:tagged")
    assert proc.wait(timeout=60) == 0
    assert store.image("localhost/edge:tagged").id == store.image("edge").id


def test_reading_while_podman_pulls_into_the_same_store(store_copy: StoreDirs, layouts: Layouts) -> None:
    store = Store.open(store_copy.root)
    edge = store.image("edge")
    proc = subprocess.Popen(
        ["skopeo", "copy", "--quiet", f"oci:{layouts.big}:big", store_copy.transport("localhost/big:latest")],
        env=store_copy.env,
        stderr=subprocess.PIPE,
    )
    rounds = 0
    # Overlap, from the kernel's lock table (sampled every 2 ms): at one instant a read of ours was in
    # flight, waiting on a store lock file that skopeo held for writing (committing the layer or the
    # image); every read, that one included, completed and saw the edge image unchanged.
    with LockWatch(store_lock_files(store_copy)) as watch:
        while proc.poll() is None or rounds == 0:
            with store.read_lock():
                image = store.image("edge")
                assert image.id == edge.id
                for layer in image.layers:
                    reassemble(layer)
            rounds += 1
            time.sleep(0.05)  # POSIX locks have no writer preference: leave the waiting writer a gap
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert watch.contended(holder=proc.pid, waiter=os.getpid()), (
        f"no read waited for the pull's write lock in {rounds} rounds over {len(watch.samples)} samples"
    )
    big = store.image("big")
    with store.read_lock():
        for layer in big.layers:
            reassemble(layer)
