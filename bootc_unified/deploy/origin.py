"""`state/deploy/<id>/<id>.origin`: where a deployment's image came from, as bootc writes it.

    [origin]
    container-image-reference = ostree-unverified-image:docker://quay.io/example/os:latest

    [boot]
    boot_type = bls
    digest = <sha256 of vmlinuz then initrd>

    [image]
    manifest_digest = sha256:<hex>

(bootc `BC/state.rs`, written with tini: `key = value`, a blank line between sections.) The prefix
is always `ostree-unverified-image:`; the rest is `docker://<name>` for a registry image,
`containers-storage:<name>` or `oci:<dir>` otherwise.

One section of ours may follow bootc's (bootc ignores sections it does not know):

    [bootc-unified]
    pull-path = unified        (or direct: how upgrade/switch fetched the image)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bootc_unified.deploy.spec import ImageReference
from bootc_unified.errors import UserError

UNVERIFIED = "ostree-unverified-image:"
# containers-image transport prefix <-> bootc ImageReference.transport
TRANSPORTS = {"docker://": "registry", "containers-storage:": "containers-storage", "oci:": "oci"}


def parse_imgref(text: str, where: str = "image reference") -> ImageReference:
    """`docker://NAME`, `containers-storage:NAME` or `oci:DIR` (optionally after the ostree prefix)."""
    rest = text.removeprefix(UNVERIFIED).removeprefix("ostree-remote-image:")
    for prefix, transport in TRANSPORTS.items():
        if rest.startswith(prefix) and rest.removeprefix(prefix):
            return ImageReference(rest.removeprefix(prefix), transport)
    raise UserError(f"{where}: {text!r} is not docker://NAME, containers-storage:NAME or oci:DIR")


def format_imgref(ref: ImageReference) -> str:
    """The containers-image form: `docker://NAME`, `containers-storage:NAME`, `oci:DIR`."""
    for prefix, transport in TRANSPORTS.items():
        if transport == ref.transport:
            return prefix + ref.image
    raise UserError(f"image {ref.image}: unknown transport {ref.transport!r}")


@dataclass(frozen=True)
class OriginSection:  # [origin]
    container_image_reference: str  # e.g. ostree-unverified-image:docker://quay.io/example/os:latest


@dataclass(frozen=True)
class BootSection:  # [boot]
    boot_type: str  # "bls" or "uki"
    digest: str | None  # sha256 hex of vmlinuz + initrd


@dataclass(frozen=True)
class ImageSection:  # [image]
    manifest_digest: str


PULL_PATHS = ("unified", "direct")


@dataclass(frozen=True)
class OursSection:  # [bootc-unified], not bootc's
    pull_path: str | None = None  # "unified" or "direct" (upgrade/switch); None: not recorded


@dataclass(frozen=True)
class Origin:
    origin: OriginSection
    boot: BootSection
    image: ImageSection
    ours: OursSection = OursSection()

    @classmethod
    def new(cls, ref: ImageReference, boot_digest: str | None, manifest_digest: str) -> Origin:
        return cls(
            OriginSection(UNVERIFIED + format_imgref(ref)),
            BootSection("bls", boot_digest),
            ImageSection(manifest_digest),
        )

    @property
    def imgref(self) -> ImageReference:
        return parse_imgref(self.origin.container_image_reference, "[origin] container-image-reference")

    def render(self) -> str:
        sections: list[tuple[str, list[tuple[str, str | None]]]] = [
            ("origin", [("container-image-reference", self.origin.container_image_reference)]),
            ("boot", [("boot_type", self.boot.boot_type), ("digest", self.boot.digest)]),
            ("image", [("manifest_digest", self.image.manifest_digest)]),
        ]
        if self.ours.pull_path is not None:
            sections.append(("bootc-unified", [("pull-path", self.ours.pull_path)]))
        blocks = []
        for name, keys in sections:
            lines = [f"[{name}]"] + [f"{k} = {v}" for k, v in keys if v is not None]
            blocks.append("\n".join(lines) + "\n")
        return "\n".join(blocks)

    @classmethod
    def parse(cls, text: str, where: str) -> Origin:
        data: dict[str, dict[str, str]] = {}
        section: dict[str, str] | None = None
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                section = data.setdefault(line[1:-1].strip(), {})
                continue
            key, eq, value = line.partition("=")
            if not eq or section is None:
                raise UserError(f"{where}:{n}: expected [section] or key = value, got {raw!r}")
            section[key.strip()] = value.strip()

        def get(sec: str, key: str, required: bool = True) -> str | None:
            value = data.get(sec, {}).get(key)
            if value is None and required:
                raise UserError(f"{where}: no {key} in [{sec}]")
            return value

        origin = cls(
            OriginSection(str(get("origin", "container-image-reference"))),
            BootSection(get("boot", "boot_type", False) or "bls", get("boot", "digest", False)),
            ImageSection(str(get("image", "manifest_digest"))),
            OursSection(get("bootc-unified", "pull-path", False)),
        )
        if origin.ours.pull_path not in (None, *PULL_PATHS):
            raise UserError(
                f"{where}: [bootc-unified] pull-path {origin.ours.pull_path!r} is not unified or direct"
            )
        parse_imgref(origin.origin.container_image_reference, f"{where}: [origin] container-image-reference")
        return origin

    @classmethod
    def read(cls, path: Path) -> Origin:
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UserError(f"{path}: origin file is missing") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read origin file ({e})") from e
        return cls.parse(text, str(path))

    def write(self, path: Path) -> None:
        """Atomically (temporary file, fsync, rename), mode 0644."""
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            f.write(self.render())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
