"""Build guest images as multi-layer OCI images in the cached buildah store, and push them.

    base      the mmdebstrap rootfs, imported as one layer          (key: base.toml + package versions)
    os        + our package layer: the working tree's bootc_unified,
                /usr/bin/bootc-unified, root's authorized SSH key, and
                what makes the image bootable (harness/images/bootable.py:
                kernel + initramfs with our early-boot script in
                /usr/lib/modules/<kver>/, units, storage.conf)       (key: + source tree + public key)
    <variant> + the variant's own layers (images/guest/<variant>.toml) (key: + the variant file)

Every image is tagged `localhost/bootc-unified/<name>:<key>`; a tag that exists is reused, so a
second build with the same inputs is a few `buildah inspect` calls.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from harness.cache import digest, file_lock, tree_digest
from harness.images.bootable import make_bootable
from harness.images.buildah import Buildah
from harness.images.definitions import (
    DEFINITIONS,
    REPO_ROOT,
    BaseDef,
    DefinitionError,
    LayerDef,
    VariantDef,
    load_base,
    load_variant,
)
from harness.images.rootfs import build_rootfs

# initramfs-tools scripts have no suffix; units are .service, .socket, ...
BOOT_FILE_SUFFIXES = ("", ".service", ".socket", ".mount", ".target", ".timer", ".conf", ".sh")

ENTRY_SCRIPT = """#!/usr/bin/python3
import sys

from bootc_unified.cli import run

sys.exit(run())
"""


@dataclass(frozen=True)
class GuestImage:
    variant: str
    tag: str  # in the cached buildah store
    image_id: str
    key: str
    layers: list[str]  # DiffIDs, base first
    built_seconds: float  # time this call spent building (0.0: all cached)

    def repository(self) -> str:
        return f"bootc-unified/{self.variant}"


@dataclass
class ImageBuilder:
    public_key: str
    definitions: Path = DEFINITIONS
    source_root: Path = REPO_ROOT
    buildah: Buildah = field(default_factory=Buildah.cached)

    def build(self, variant: str) -> GuestImage:
        started = time.monotonic()
        self._built = False
        tag, image_id = self._build(variant)
        return GuestImage(
            variant=variant,
            tag=tag,
            image_id=image_id,
            key=tag.rsplit(":", 1)[1],
            layers=self.buildah.layers(tag),
            built_seconds=time.monotonic() - started if self._built else 0.0,
        )

    def push(self, image: GuestImage, registry_address: str, reference: str | None = None) -> str:
        """Push to `registry_address` (host:port) as `reference` (default bootc-unified/<variant>:latest).

        Returns the pushed reference, `host:port/repository:tag`."""
        ref = f"{registry_address}/{reference or image.repository() + ':latest'}"
        self.buildah.push(image.tag, f"docker://{ref}")
        return ref

    @contextmanager
    def rootfs(self, image: GuestImage) -> Iterator[Path]:
        """The image's flattened filesystem, mounted read-write but to be treated as read-only."""
        container = self.buildah.from_(image.tag)
        try:
            with self.buildah.mounted(container) as root:
                yield root
        finally:
            self.buildah.remove_container(container)

    # -- building ---------------------------------------------------------------------------

    _built: bool = field(default=False, init=False, repr=False)

    def _build(self, name: str) -> tuple[str, str]:
        """(tag, image ID) of image `name` ("base", "os" or a variant), building what is missing."""
        if name == "scratch":
            raise DefinitionError("scratch is not an image")
        base = load_base(self.definitions)
        if name == "base":
            rootfs = build_rootfs(base)
            key = digest("base-v2", rootfs.key, rootfs.manifest.read_bytes())
            return self._ensure("base", key, "scratch", lambda c: self._base_layer(c, rootfs.tarball))
        if name == "os":
            parent_tag, _ = self._build("base")
            source = self.source_root / base.package_source
            boot = [
                tree_digest(self.source_root / p, BOOT_FILE_SUFFIXES)
                for p in (base.bootable.initramfs, base.bootable.units)
            ]
            key = digest("os-v2", parent_tag, tree_digest(source), *boot, self.public_key)
            return self._ensure("os", key, parent_tag, lambda c: self._package_layer(c, base, source))
        variant = load_variant(name, self.definitions)
        if not variant.layers:
            raise DefinitionError(f"{variant.path}: a variant needs at least one [[layers]] entry")
        current = "scratch" if variant.parent == "scratch" else self._build(variant.parent)[0]
        key = digest("variant-v1", current, variant.raw)
        built = ("", "")
        for i, layer in enumerate(variant.layers):
            last = i == len(variant.layers) - 1
            step = name if last else f"{name}-layer{i}"
            built = self._ensure(
                step, key, current, partial(self._variant_layer, layer=layer, config=last, variant=variant)
            )
            current = built[0]
        return built

    def _ensure(self, name: str, key: str, parent: str, fill: Callable[[str], None]) -> tuple[str, str]:
        tag = f"localhost/bootc-unified/{name}:{key}"
        with file_lock(f"image-{name}-{key}"):
            image_id = self.buildah.image_id(tag)
            if image_id:
                return tag, image_id
            self._built = True
            container = self.buildah.from_(parent)
            try:
                fill(container)
                self.buildah.commit(container, tag)
            except BaseException:
                self.buildah.remove_container(container)
                raise
            image_id = self.buildah.image_id(tag)
            assert image_id, f"buildah committed {tag} but cannot find it"
            return tag, image_id

    def _variant_layer(self, container: str, layer: LayerDef, config: bool, variant: VariantDef) -> None:
        with self.buildah.mounted(container) as root:
            apply_layer(root, layer)
        if config:
            self.buildah.config(container, variant.cmd, variant.labels)

    def _base_layer(self, container: str, tarball: Path) -> None:
        self.buildah.add_tarball(container, tarball)
        with self.buildah.mounted(container) as root:
            # The rootfs comes without /dev (no device nodes in layers), but the initramfs moves
            # its /dev onto the root filesystem, so the directory must exist.
            (root / "dev").mkdir(mode=0o755, exist_ok=True)

    def _package_layer(self, container: str, base: BaseDef, source: Path) -> None:
        with self.buildah.mounted(container) as root:
            target = inside(root, base.package_target)
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            entry = inside(root, base.package_entry)
            entry.parent.mkdir(parents=True, exist_ok=True)
            entry.write_text(ENTRY_SCRIPT)
            entry.chmod(0o755)
            ssh = inside(root, "/root/.ssh")
            ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
            (ssh / "authorized_keys").write_text(self.public_key.strip() + "\n")
            (ssh / "authorized_keys").chmod(0o600)
            make_bootable(self.buildah, container, root, base.bootable, self.source_root)


def inside(root: Path, path: str) -> Path:
    """`path` (absolute, in the image) under `root`, refusing anything that resolves outside it."""
    candidate = root / path.lstrip("/")
    resolved = candidate.parent.resolve() / candidate.name
    if not resolved.is_relative_to(root.resolve()):
        raise DefinitionError(f"{path} resolves outside the image ({resolved})")
    return resolved


def apply_layer(root: Path, layer: LayerDef) -> None:
    """Write one layer's changes into the mounted container `root`."""
    for path in layer.remove:
        target = inside(root, path)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    for path, content in layer.files.items():
        target = inside(root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(0o755 if path in layer.executables else 0o644)
    for path, host_path in layer.host_files.items():
        target = inside(root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(host_path, target)
    for path, link in layer.symlinks.items():
        target = inside(root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        os.symlink(link, target)
