"""Import an image from a containers-storage (the bootc store) into a bare ostree repository
without writing its file data again.

1. The merged tree (tree.py) from every layer's tar-split headers and diff/ files, each regular
   file's and symlink's ostree content checksum computed (gvariant.py); every layer's DiffID is
   verified as it is walked, so a damaged layer fails before anything is written.
2. Under libostree's shared repository lock: one content object per checksum in the tree
   (repo.place_regular: reflink, else the diff/ inode itself, else copy; counted), then the tree as
   directories of hardlinks to the objects in the repository's `tmp/`.
3. `ostree commit --tree=dir=... --link-checkout-speedup`: every file is found in the objects by
   (device, inode), so the commit writes only dirtree, dirmeta and commit objects. Its metadata and
   ref are the ones bootc's ostree container store writes (`ostree.manifest-digest`,
   `ostree.manifest`, `ostree.container.image-config`, `ostree.tar-filtered`; the ref
   `ostree/container/image/<escaped image reference>`); the ref is written last.

A crash leaves complete objects (linked from O_TMPFILEs) and perhaps an orphan commit, which
`ostree fsck` accepts and `ostree prune` removes, plus a stale tree under `tmp/`, removed by the
next import.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from bootc_unified import faults
from bootc_unified.cstorage import Image, Store
from bootc_unified.errors import UserError
from bootc_unified.importer import raw_manifest

from .repo import OstreeRepo, Placed, ostree_version
from .tree import Dir, File, Link, MergedTree, build

IMAGE_PREFIX = "ostree/container/image"
META_MANIFEST_DIGEST = "ostree.manifest-digest"
META_MANIFEST = "ostree.manifest"
META_CONFIG = "ostree.container.image-config"
META_FILTERED = "ostree.tar-filtered"
META_IMPORTER = "ostree.importer.version"
IMPORTER_VERSION = "bootc-unified"
TMP_PREFIX = "bootc-unified-import-"


def escape_for_ref(s: str) -> str:
    """ostree-ext's refescape: [A-Za-z0-9] and `-` as is, `/` after an alphanumeric and before
    more, `_` as `__`, anything else as `_XX_` (its code point in hex)."""
    if not s:
        raise UserError("an empty image reference cannot name an ostree ref")
    out: list[str] = []
    previous_alnum = False
    for i, c in enumerate(s):
        alnum = c.isascii() and c.isalnum()
        if c == "\0":
            raise UserError(f"image reference {s!r}: embedded NUL")
        if alnum or (c == "/" and previous_alnum and i + 1 < len(s)) or c == "-":
            out.append(c)
        elif c == "_":
            out.append("__")
        else:
            out.append(f"_{ord(c):02X}_")
        previous_alnum = alnum
    return "".join(out)


def image_ref(imgref: str) -> str:
    """`ostree/container/image/<escaped>` of an ostree-ext ImageReference such as `registry:quay.io/x:1`."""
    return f"{IMAGE_PREFIX}/{escape_for_ref(imgref)}"


@dataclass
class Counts:
    objects: int = 0
    bytes: int = 0

    def to_json(self) -> dict[str, int]:
        return {"objects": self.objects, "bytes": self.bytes}


@dataclass
class OstreeImportResult:
    image: str
    imgref: str
    manifest_digest: str
    commit: str = ""
    ref: str = ""
    placed: dict[str, Counts] = field(default_factory=lambda: {p.value: Counts() for p in Placed})
    files: int = 0
    filtered: dict[str, dict[str, int]] = field(default_factory=dict)
    special: int = 0
    special_first: str | None = None
    tree: MergedTree | None = field(default=None, repr=False)  # what was committed (for dedupe)

    def warning(self) -> str | None:
        """One line naming what ostree could not hold and was dropped, or None."""
        if not self.special:
            return None
        return (
            f"warning: image {self.image}: {self.special} entr{'y' if self.special == 1 else 'ies'} "
            f"ostree cannot hold (devices, FIFOs, names that are not UTF-8) dropped, the first "
            f"{self.special_first!r}"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "image": self.image,
            "imgref": self.imgref,
            "manifest_digest": self.manifest_digest,
            "commit": self.commit,
            "ref": self.ref,
            "files": self.files,
            "objects": {k: v.to_json() for k, v in self.placed.items()},
            "filtered": self.filtered,
            "special_skipped": self.special,
            "special_first": self.special_first,
        }


def timestamp_of(manifest: dict[str, object], config: dict[str, object]) -> int | None:
    """ostree-ext's commit timestamp: the manifest's `org.opencontainers.image.created`
    annotation, else the config's `created`."""
    annotations = manifest.get("annotations")
    value = annotations.get("org.opencontainers.image.created") if isinstance(annotations, dict) else None
    value = value or config.get("created")
    if not isinstance(value, str):
        return None
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None


def _gvariant_filtered(filtered: dict[str, dict[str, int]]) -> str:
    """`a{sa{su}}` in GVariant text format."""

    def q(s: str) -> str:
        return json.dumps(s)  # a GVariant text string accepts JSON's double-quoted escapes

    inner = ", ".join(
        f"{q(layer)}: {{{', '.join(f'{q(k)}: uint32 {v}' for k, v in sorted(names.items()))}}}"
        for layer, names in sorted(filtered.items())
    )
    return f"@a{{sa{{su}}}} {{{inner}}}"


def remove_stale_trees(repo: OstreeRepo) -> None:
    """Trees left in tmp/ by imports that died (their pid is gone)."""
    for entry in repo.tmp.glob(f"{TMP_PREFIX}*"):
        pid = entry.name[len(TMP_PREFIX) :].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(entry, ignore_errors=True)


def import_image(
    repo: OstreeRepo,
    store: Store,
    ref: str,
    imgref: str | None = None,
    retain_var: bool | None = None,
) -> OstreeImportResult:
    """Import `ref` from `store`; the ostree ref names `imgref` (default `registry:<first name>`)."""
    if retain_var is None:
        retain_var = ostree_version() >= (2024, 3)
    with store.read_lock():
        image = store.image(ref)
        for layer in image.layers:
            layer.check_complete()
        manifest = raw_manifest(store, image)
        config = store.big_data(image.record, image.config_digest)
        name = imgref or f"registry:{image.names[0] if image.names else image.id}"
        result = OstreeImportResult(ref, name, image.manifest_digest, ref=image_ref(name))
        tree = build(list(zip(image.layers, _blob_digests(image), strict=True)), retain_var)
        result.filtered, result.special, result.tree = tree.filtered, tree.special, tree
        if tree.special_first is not None:
            result.special_first = tree.special_first.decode("utf-8", "backslashreplace")
        faults.point("ostree-import-after-walk")
        remove_stale_trees(repo)
        with repo.shared_lock():
            workdir = repo.tmp / f"{TMP_PREFIX}{os.getpid()}-{image.id[:12]}"
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir()
            try:
                _place_objects(repo, tree, result)
                root = workdir / "root"
                _write_tree(repo, tree, root)
                faults.point("ostree-import-before-commit")
                timestamp = timestamp_of(image.manifest, image.config)
                result.commit = repo.commit_tree(
                    root,
                    None,
                    timestamp if timestamp is not None else int(datetime.now().timestamp()),
                    {
                        META_MANIFEST_DIGEST: image.manifest_digest,
                        META_MANIFEST: manifest.decode(),
                        META_CONFIG: config.decode(),
                        META_IMPORTER: IMPORTER_VERSION,
                    },
                    {META_FILTERED: _gvariant_filtered(tree.filtered)},
                )
                faults.point("ostree-import-before-ref")
                repo.set_ref(result.ref, result.commit)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    return result


def _blob_digests(image: Image) -> list[str]:
    layers = image.manifest.get("layers")
    digests = [d.get("digest") for d in layers] if isinstance(layers, list) else []
    if len(digests) != len(image.layers) or not all(isinstance(d, str) for d in digests):
        raise UserError(f"image {image.label}: the manifest does not list one blob per layer")
    return [str(d) for d in digests]


def _place_objects(repo: OstreeRepo, tree: MergedTree, result: OstreeImportResult) -> None:
    done: set[str] = set()
    for _path, node in tree.walk():
        if isinstance(node, Dir):
            continue
        result.files += 1
        if node.checksum in done:
            continue
        done.add(node.checksum)
        if isinstance(node, Link):
            how = repo.place_symlink(node.checksum, node.target, node.meta)
            size = 0
        elif node.source is None:
            how = repo.place_empty(node.checksum, node.meta)
            size = 0
        else:
            how = repo.place_regular(node.source, node.checksum, node.meta, node.size)
            size = node.size
        counts = result.placed[how.value]
        counts.objects += 1
        counts.bytes += size
        faults.point("ostree-import-object")


def _write_tree(repo: OstreeRepo, tree: MergedTree, root: Path) -> None:
    """Directories with their metadata; files as hardlinks to their objects."""
    dirs: list[tuple[Path, Dir]] = []
    for path, node in tree.walk():
        dest = root / os.fsdecode(path) if path else root
        if isinstance(node, Dir):
            dest.mkdir(mode=0o700)
            dirs.append((dest, node))
        else:
            os.link(repo.object_path(node.checksum), dest, follow_symlinks=False)
    for dest, d in reversed(dirs):  # metadata last, children first
        os.chown(dest, d.meta.uid, d.meta.gid)
        os.chmod(dest, stat.S_IMODE(d.meta.mode))
        for xname, value in d.meta.xattrs.items():
            os.setxattr(dest, xname, value)


__all__ = ["File", "OstreeImportResult", "image_ref", "import_image"]
