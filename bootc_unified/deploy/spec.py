"""The `bootc status` document: Host{spec, status} as bootc's `crates/lib/src/spec.rs` defines it.

Field for field bootc's (@534c76e, reference/deployments.md section 9), camelCase through jsonmodel,
with two additions of ours: `BootEntry.unified` (is the entry's image in the bootc-owned
containers-storage, `<root>/ostree/bootc/storage`) and `BootEntry.pull_path` (`pullPath`: how
upgrade/switch fetched it, "unified" or "direct", from the origin's [bootc-unified] section; left
out when not recorded, e.g. for an installed deployment). `timestamp` is an RFC 3339 string (bootc:
chrono DateTime<Utc>).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from bootc_unified.jsonmodel import OMIT_EMPTY, from_dict, rename, to_dict

API_VERSION = "org.containers.bootc/v1"
KIND = "BootcHost"

BootOrder = Literal["default", "rollback"]
BootType = Literal["Bls", "Uki"]
Bootloader = Literal["grub", "grub-cc", "systemd", "none"]


@dataclass(frozen=True)
class ImageReference:  # bootc spec.rs ImageReference
    image: str
    transport: str  # "registry", "containers-storage", "oci", ...
    signature: str | None = field(default=None, metadata=OMIT_EMPTY)  # we never verify signatures

    def __str__(self) -> str:
        if self.transport == "registry":
            return self.image
        return f"{self.transport}:{self.image}"


@dataclass(frozen=True)
class ImageStatus:  # bootc spec.rs ImageStatus
    image: ImageReference
    version: str | None
    timestamp: str | None
    image_digest: str
    architecture: str


@dataclass(frozen=True)
class BootEntryComposefs:  # bootc spec.rs BootEntryComposefs
    verity: str
    boot_type: BootType
    bootloader: Bootloader
    boot_digest: str | None
    missing_verity_allowed: bool = False


@dataclass(frozen=True)
class BootEntry:  # bootc spec.rs BootEntry (+ `unified`, `pullPath`: ours)
    image: ImageStatus | None
    cached_update: ImageStatus | None = None
    incompatible: bool = False
    pinned: bool = False
    soft_reboot_capable: bool = False
    download_only: bool = False
    store: str | None = None
    ostree: dict[str, Any] | None = None
    composefs: BootEntryComposefs | None = None
    unified: bool = False
    pull_path: str | None = field(default=None, metadata=OMIT_EMPTY)


@dataclass(frozen=True)
class FilesystemOverlay:  # bootc spec.rs FilesystemOverlay
    access_mode: Literal["readOnly", "readWrite"]
    persistence: Literal["transient", "persistent"]


@dataclass(frozen=True)
class HostStatus:  # bootc spec.rs HostStatus
    staged: BootEntry | None = None
    booted: BootEntry | None = None
    rollback: BootEntry | None = None
    other_deployments: tuple[BootEntry, ...] = field(default=(), metadata=OMIT_EMPTY)
    rollback_queued: bool = False
    ty: str | None = field(default=None, metadata=rename("type"))  # never set on composefs
    usr_overlay: FilesystemOverlay | None = None
    read_only: bool = False  # the physical root is on a read-only medium (bootc a05328f0)


@dataclass(frozen=True)
class HostSpec:  # bootc spec.rs HostSpec
    image: ImageReference | None = None
    boot_order: BootOrder = "default"


@dataclass(frozen=True)
class ObjectMeta:  # bootc k8sapitypes ObjectMeta (only `name` is ever set)
    name: str = "host"


@dataclass(frozen=True)
class Host:  # bootc spec.rs Host (k8s Resource flattened in)
    api_version: str = API_VERSION
    kind: str = KIND
    metadata: ObjectMeta = field(default_factory=ObjectMeta)
    spec: HostSpec = field(default_factory=HostSpec)
    status: HostStatus = field(default_factory=HostStatus)

    def to_json(self) -> str:
        """bootc's canonical JSON: sorted keys, compact."""
        return json.dumps(to_dict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Host:
        return from_dict(cls, json.loads(text))
