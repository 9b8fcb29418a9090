"""Images with hand-made layer tars, and private overlay containers-storages to put them in.

The layer tars are written byte for byte by Python's tarfile (PAX and GNU formats, with the edge
cases a layer reader must survive), wrapped into an OCI layout whose config lists their sha256 as
DiffIDs, and copied into a store with `skopeo copy` (containers/image + containers/storage do the
unpacking and write the tar-split). So the expected DiffIDs and the expected tar bytes are known
before the store ever sees them: an oracle independent of this project's reader.

Stores live under a caller-given directory with their own storage.conf (never the host's store).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.run import run

MTIME = 1_700_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class StoreDirs:
    root: Path
    runroot: Path
    conf: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_STORAGE_CONF": str(self.conf)}

    def transport(self, name: str) -> str:
        return f"containers-storage:[overlay@{self.root}+{self.runroot}]{name}"

    def podman(self, *args: str) -> list[str]:
        return self._tool("podman", args)

    def buildah(self, *args: str) -> list[str]:
        return self._tool("buildah", args)

    def _tool(self, tool: str, args: tuple[str, ...]) -> list[str]:
        return [
            tool,
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "overlay",
            *args,
        ]


def make_store_dirs(base: Path) -> StoreDirs:
    """Paths (and a storage.conf) for a private overlay store under `base`; podman creates it on first use.

    The runroot is a short directory in /tmp (podman refuses runroots over 50 characters); remove it
    with `release_store` when done.
    """
    base.mkdir(parents=True, exist_ok=True)
    root, conf = base / "root", base / "storage.conf"
    runroot = Path(tempfile.mkdtemp(prefix="cstor-rr-", dir="/tmp"))
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{root}"\nrunroot = "{runroot}"\n')
    return StoreDirs(root, runroot, conf)


def release_store(store: StoreDirs) -> None:
    """Undo what podman leaves behind: the private bind mount of <root>/overlay and the runroot."""
    target = str(store.root / "overlay")
    with open("/proc/self/mounts") as f:
        mounted = any(line.split()[1] == target for line in f)
    if mounted:
        run(["umount", target], check=False)
    shutil.rmtree(store.runroot, ignore_errors=True)


def copy_into_store(layout: Path, tag: str, store: StoreDirs, name: str) -> None:
    """Copy image `tag` of the OCI layout into the store as `name` (containers/image does the unpacking)."""
    run(
        ["skopeo", "copy", "--quiet", f"oci:{layout}:{tag}", store.transport(name)],
        env=store.env,
        timeout=600,
    )


# --- tar building ------------------------------------------------------------------------------


def _content(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, **kw: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = MTIME
    ti.uname = ti.gname = "root"
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _add(tf: tarfile.TarFile, ti: tarfile.TarInfo, data: bytes = b"") -> None:
    ti.size = len(data) if ti.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    tf.addfile(ti, io.BytesIO(data) if ti.size else None)


def _open_tar(fmt: int) -> tuple[io.BytesIO, tarfile.TarFile]:
    buf = io.BytesIO()
    return buf, tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape")


def base_layer() -> bytes:
    """PAX layer: every file type, sizes around block boundaries, xattrs, long and non-UTF-8 names."""
    buf, tf = _open_tar(tarfile.PAX_FORMAT)
    for d in ("bin", "data", "dev", "etc", "opaque", "long"):
        _add(tf, _info(d + "/", tarfile.DIRTYPE, 0o755))
    for size in (0, 1, 64, 65, 511, 512, 513, 4096, (1 << 20) + 1):
        _add(tf, _info(f"data/f{size}"), _content(f"f{size}", size))
    _add(tf, _info("data/hard", tarfile.LNKTYPE, linkname="data/f65"))
    _add(tf, _info("data/sym", tarfile.SYMTYPE, 0o777, linkname="f64"))
    _add(tf, _info("data/dangling", tarfile.SYMTYPE, 0o777, linkname="/nowhere/" + "t" * 120))
    _add(tf, _info("data/fifo", tarfile.FIFOTYPE, 0o600))
    _add(tf, _info("dev/null2", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3))
    _add(tf, _info("bin/suid", mode=0o4755), b"#!/bin/sh\n")
    _add(tf, _info("bin/sgid-sticky", mode=0o3755), b"x")
    _add(tf, _info("etc/owned", mode=0o640, uid=1000, gid=1001, uname="user", gname="grp"), b"mine\n")
    xattrs = {"SCHILY.xattr.user.note": "hello", "SCHILY.xattr.user.empty": ""}
    _add(tf, _info("etc/xattr", pax_headers=xattrs), b"has xattrs\n")
    _add(tf, _info("long/" + "d" * 120 + "/", tarfile.DIRTYPE, 0o755))
    _add(tf, _info("long/" + "d" * 120 + "/file-with-a-long-path"), _content("long", 300))
    _add(tf, _info("data/bad\udcffname"), _content("bad", 70))  # 0xff: not UTF-8
    _add(tf, _info("data/ünïcödé"), b"utf-8 name\n")
    _add(tf, _info("opaque/a"), b"a\n")
    _add(tf, _info("opaque/sub/", tarfile.DIRTYPE, 0o755))
    _add(tf, _info("opaque/sub/b"), b"b\n")
    _add(tf, _info("gone"), b"to be deleted\n")
    _add(tf, _info("gone-dir/", tarfile.DIRTYPE, 0o755))
    _add(tf, _info("gone-dir/x"), b"x\n")
    tf.close()
    return buf.getvalue()


def change_layer() -> bytes:
    """GNU layer on top of base_layer: whiteouts, an opaque dir, mode/owner changes, GNU long names."""
    buf, tf = _open_tar(tarfile.GNU_FORMAT)
    _add(tf, _info(".wh.gone", mode=0o600))
    _add(tf, _info(".wh.gone-dir", mode=0o600))
    _add(tf, _info("data/f0", tarfile.CHRTYPE, 0o600, devmajor=0, devminor=0))  # overlay-style whiteout
    _add(tf, _info("opaque/", tarfile.DIRTYPE, 0o700))
    _add(tf, _info("opaque/.wh..wh..opq", mode=0o600))
    _add(tf, _info("opaque/c"), b"c\n")
    _add(tf, _info("data/", tarfile.DIRTYPE, 0o750, uid=7, gid=7))
    _add(tf, _info("data/f1", mode=0o600, uid=5, gid=6), _content("f1", 1))
    _add(tf, _info("gnu/", tarfile.DIRTYPE, 0o755))
    _add(tf, _info("gnu/" + "e" * 150), _content("gnu-long", 2000))
    _add(tf, _info("gnu/link", tarfile.SYMTYPE, 0o777, linkname="e" * 150 + "/../" + "f" * 20))
    _add(tf, _info("gnu/raw\udcfe\udcfd"), b"gnu non-utf8\n")
    tf.close()
    return buf.getvalue()


def empty_layer() -> bytes:
    buf, tf = _open_tar(tarfile.PAX_FORMAT)
    tf.close()
    return buf.getvalue()


def tree_layer(src: Path, arcname: str) -> bytes:
    """A layer holding the directory tree `src` under `arcname` (PAX)."""
    buf, tf = _open_tar(tarfile.PAX_FORMAT)
    tf.add(src, arcname=arcname)
    tf.close()
    return buf.getvalue()


# --- OCI layout --------------------------------------------------------------------------------


def _blob(layout: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest.split(":")[1]
    if not path.exists():
        path.write_bytes(data)
    return digest


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    layers: tuple[bytes, ...]  # the exact layer tars

    @property
    def diff_ids(self) -> list[str]:
        return ["sha256:" + hashlib.sha256(t).hexdigest() for t in self.layers]


def write_oci_layout(layout: Path, images: list[BuiltImage], *, gzip_layers: bool = True) -> None:
    """Write (or extend) an OCI layout with `images`, tagged by annotation. Layers are gzip-compressed
    (level 1) when `gzip_layers`, else stored as plain tars."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index_path = layout / "index.json"
    index: dict[str, Any] = {"schemaVersion": 2, "manifests": []}
    if index_path.exists():
        index = json.loads(index_path.read_text())
    for image in images:
        descs = []
        for tar in image.layers:
            blob = gzip.compress(tar, compresslevel=1, mtime=0) if gzip_layers else tar
            media = LAYER_GZIP if gzip_layers else LAYER_TAR
            descs.append({"mediaType": media, "digest": _blob(layout, blob), "size": len(blob)})
        config = {
            "created": "2023-11-14T22:13:20Z",
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": image.diff_ids},
            "history": [
                {"created": "2023-11-14T22:13:20Z", "created_by": f"layer {i}"} for i in range(len(descs))
            ],
        }
        config_bytes = json.dumps(config).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": _blob(layout, config_bytes),
                "size": len(config_bytes),
            },
            "layers": descs,
        }
        manifest_bytes = json.dumps(manifest).encode()
        index["manifests"].append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": _blob(layout, manifest_bytes),
                "size": len(manifest_bytes),
                "annotations": {REF_NAME: image.tag},
            }
        )
    index_path.write_text(json.dumps(index))


def add_index(layout: Path, tag: str, index_tag: str) -> str:
    """Tag `index_tag`: an OCI image index (manifest list) holding image `tag` for linux/amd64.
    Returns the index's digest."""
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    [desc] = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == tag]
    entry = {k: v for k, v in desc.items() if k != "annotations"}
    entry["platform"] = {"architecture": "amd64", "os": "linux"}
    data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}).encode()
    digest = _blob(layout, data)
    index["manifests"].append(
        {"mediaType": OCI_INDEX, "digest": digest, "size": len(data), "annotations": {REF_NAME: index_tag}}
    )
    index_path.write_text(json.dumps(index))
    return digest


def edge_case_images() -> list[BuiltImage]:
    """`edge`: base + changes + empty layer; `shared`: the same base layer with an empty layer on top."""
    base, change, empty = base_layer(), change_layer(), empty_layer()
    return [BuiltImage("edge", (base, change, empty)), BuiltImage("shared", (base, empty))]


def buildah_tree_image(src: Path, dest: str, workdir: Path, layout: Path, tag: str) -> None:
    """An image whose one layer containers/storage itself produced (buildah copy + commit) from `src`."""
    store = make_store_dirs(workdir)
    base = store.buildah()
    ctr = run([*base, "from", "scratch"], env=store.env).stdout.strip()
    run([*base, "copy", ctr, str(src), dest], env=store.env, timeout=600)
    run([*base, "commit", "--quiet", ctr, f"oci:{layout}:{tag}"], env=store.env, timeout=600)
    run([*base, "rm", ctr], env=store.env)
    release_store(store)


def build_layered_image(store: StoreDirs, sources: list[str], image: str) -> None:
    """`image` in `store`, one layer per source directory (buildah copy + commit, no RUN steps), each
    directory at its own path inside the image."""
    base = store.buildah()
    parent = "scratch"
    for i, src in enumerate(sources):
        ctr = run([*base, "from", "--pull-never", parent], env=store.env).stdout.strip()
        run([*base, "copy", ctr, src, src], env=store.env, timeout=1800)
        tag = f"{image}-{i}" if i < len(sources) - 1 else image
        run([*base, "commit", "--quiet", ctr, tag], env=store.env, timeout=1800)
        run([*base, "rm", ctr], env=store.env)
        parent = tag
