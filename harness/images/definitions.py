"""Guest image definitions, read from images/guest/*.toml (data, not code).

`base.toml` is the operating system (an mmdebstrap rootfs) plus where our package goes; every other
`<variant>.toml` names a parent ("os", "scratch" or another variant) and the layers it adds, each
layer one commit: files to write, symlinks, host files to copy in, paths to remove.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFINITIONS = REPO_ROOT / "images" / "guest"


class DefinitionError(ValueError):
    pass


@dataclass(frozen=True)
class BootableDef:
    """What turns the os layer into a bootable, bootc-style image (base.toml's [bootable])."""

    initramfs: str  # source tree dir with hooks/ and scripts/ for /usr/share/initramfs-tools
    units: str  # source tree dir of systemd units for /usr/lib/systemd/system, enabled
    additional_image_store: str  # added to /etc/containers/storage.conf
    files: dict[str, str] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    directories: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BaseDef:
    path: Path
    raw: bytes
    suite: str
    mirror: str
    variant: str
    components: list[str]
    hostname: str
    packages: list[str]
    commands: list[str]
    files: dict[str, str]
    package_source: str
    package_target: str
    package_entry: str
    bootable: BootableDef


@dataclass(frozen=True)
class LayerDef:
    files: dict[str, str] = field(default_factory=dict)
    executables: list[str] = field(default_factory=list)
    symlinks: dict[str, str] = field(default_factory=dict)
    host_files: dict[str, str] = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class VariantDef:
    name: str
    path: Path
    raw: bytes
    description: str
    parent: str
    layers: list[LayerDef]
    cmd: list[str]
    labels: dict[str, str]


def _load(path: Path) -> tuple[bytes, dict[str, Any]]:
    raw = path.read_bytes()
    try:
        return raw, tomllib.loads(raw.decode())
    except tomllib.TOMLDecodeError as e:
        raise DefinitionError(f"{path}: {e}") from e


def _strs(path: Path, data: dict[str, Any], key: str) -> list[str]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DefinitionError(f"{path}: {key} must be a list of strings")
    return value


def _table(path: Path, data: dict[str, Any], key: str) -> dict[str, str]:
    value = data.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise DefinitionError(f"{path}: {key} must be a table of strings")
    for p in value:
        if not p.startswith("/"):
            raise DefinitionError(f"{path}: {key}: {p!r} is not an absolute path")
    return value


def _labels(path: Path, config: dict[str, Any]) -> dict[str, str]:
    labels = config.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise DefinitionError(f"{path}: config.labels must be a table of strings")
    return labels


def load_base(directory: Path = DEFINITIONS) -> BaseDef:
    path = directory / "base.toml"
    raw, data = _load(path)
    package = data.get("package", {})
    bootable = data.get("bootable", {})
    try:
        return BaseDef(
            path=path,
            raw=raw,
            suite=str(data["suite"]),
            mirror=str(data["mirror"]),
            variant=str(data.get("variant", "apt")),
            components=_strs(path, data, "components") or ["main"],
            hostname=str(data.get("hostname", "guest")),
            packages=_strs(path, data, "packages"),
            commands=_strs(path, data, "commands"),
            files=_table(path, data, "files"),
            package_source=str(package["source"]),
            package_target=str(package["target"]),
            package_entry=str(package["entry"]),
            bootable=BootableDef(
                initramfs=str(bootable["initramfs"]),
                units=str(bootable["units"]),
                additional_image_store=str(bootable["additional_image_store"]),
                files=_table(path, bootable, "files"),
                symlinks=_table(path, bootable, "symlinks"),
                directories=_strs(path, bootable, "directories"),
            ),
        )
    except KeyError as e:
        raise DefinitionError(f"{path}: missing key {e}") from e


def load_variant(name: str, directory: Path = DEFINITIONS) -> VariantDef:
    path = directory / f"{name}.toml"
    if name == "base" or not path.is_file():
        raise DefinitionError(f"no guest image variant {name!r}; have {', '.join(variant_names(directory))}")
    raw, data = _load(path)
    layers = []
    for i, layer in enumerate(data.get("layers", [])):
        where = path.with_name(f"{path.name}[layers][{i}]")
        layers.append(
            LayerDef(
                files=_table(where, layer, "files"),
                executables=_strs(where, layer, "executables"),
                symlinks=_table(where, layer, "symlinks"),
                host_files=_table(where, layer, "host_files"),
                remove=_strs(where, layer, "remove"),
            )
        )
    config = data.get("config", {})
    return VariantDef(
        name=name,
        path=path,
        raw=raw,
        description=str(data.get("description", "")),
        parent=str(data.get("parent", "os")),
        layers=layers,
        cmd=_strs(path, config, "cmd"),
        labels=_labels(path, config),
    )


def variant_names(directory: Path = DEFINITIONS) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml") if p.stem != "base")
