"""The JSON records of an overlay containers-storage: overlay-images/images.json, overlay-layers/layers.json.

Only fields this project uses are lifted into typed attributes; the raw record stays available.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootc_unified.errors import UserError

_PLAIN_KEY = re.compile(r"[.0-9a-z]*")

# Big-data keys containers-storage keeps only for layers it pulled partially from a TOC (zstd:chunked,
# eStargz): the TOC itself (1.43, Debian 12's podman 4.3, which records no `toc-digest`) and its
# later cache and layer data.
PARTIAL_BIG_DATA = ("zstd-chunked-manifest", "zstd-chunked-layer-data", "chunked-manifest-cache")


def big_data_filename(key: str) -> str:
    """containers/storage's file name for a big-data key: the key itself if it is only [.0-9a-z],
    otherwise "=" + standard base64 of the key."""
    if _PLAIN_KEY.fullmatch(key):
        return key
    return "=" + base64.b64encode(key.encode()).decode()


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: record without a valid {key!r}")
    return value


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) and value else None


def _opt_int(obj: dict[str, Any], key: str) -> int | None:
    value = obj.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_list(obj: dict[str, Any], key: str) -> tuple[str, ...]:
    value = obj.get(key)
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str))


def _str_dict(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    return dict(value) if isinstance(value, dict) else {}


@dataclass(frozen=True)
class LayerRecord:
    id: str
    parent: str | None
    names: tuple[str, ...]
    diff_digest: str | None  # the DiffID: sha256 of the uncompressed layer tar
    diff_size: int | None
    compressed_digest: str | None
    compressed_size: int | None
    flags: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, compare=False)
    toc_digest: str | None = None  # the zstd:chunked TOC's digest, for a layer pulled by it
    big_data_names: tuple[str, ...] = ()

    @property
    def incomplete(self) -> bool:
        return bool(self.flags.get("incomplete"))

    @property
    def partial(self) -> bool:
        """Pulled partially, from a TOC (zstd:chunked): files fetched one by one, or taken from
        other layers, instead of one layer tar; the store may lack its tar-split and DiffID."""
        return self.toc_digest is not None or any(k in PARTIAL_BIG_DATA for k in self.big_data_names)

    @classmethod
    def from_json(cls, obj: Any, where: str) -> LayerRecord:
        if not isinstance(obj, dict):
            raise UserError(f"{where}: layer record is not a JSON object")
        return cls(
            id=_str(obj, "id", where),
            parent=_opt_str(obj, "parent"),
            names=_str_list(obj, "names"),
            diff_digest=_opt_str(obj, "diff-digest"),
            diff_size=_opt_int(obj, "diff-size"),
            compressed_digest=_opt_str(obj, "compressed-diff-digest"),
            compressed_size=_opt_int(obj, "compressed-size"),
            flags=_str_dict(obj, "flags"),
            raw=obj,
            toc_digest=_opt_str(obj, "toc-digest"),
            big_data_names=_str_list(obj, "big-data-names"),
        )


@dataclass(frozen=True)
class ImageRecord:
    id: str
    digest: str | None  # digest of the manifest the image was stored with
    digests: tuple[str, ...]  # every manifest digest the image is known by
    names: tuple[str, ...]
    top_layer: str | None
    big_data_names: tuple[str, ...]
    big_data_digests: dict[str, Any]
    big_data_sizes: dict[str, Any]
    created: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def all_digests(self) -> tuple[str, ...]:
        """Every manifest digest the image is known by, as containers/storage computes it: the
        recorded digest(s) plus the digests of all stored manifests ("manifest", "manifest-*")."""
        found = [self.digest] if self.digest else []
        found += self.digests
        for key in self.big_data_names:
            if key == "manifest" or key.startswith("manifest-"):
                value = self.big_data_digests.get(key)
                if isinstance(value, str):
                    found.append(value)
        return tuple(dict.fromkeys(found))

    @classmethod
    def from_json(cls, obj: Any, where: str) -> ImageRecord:
        if not isinstance(obj, dict):
            raise UserError(f"{where}: image record is not a JSON object")
        return cls(
            id=_str(obj, "id", where),
            digest=_opt_str(obj, "digest"),
            digests=_str_list(obj, "digests"),
            names=_str_list(obj, "names"),
            top_layer=_opt_str(obj, "layer"),
            big_data_names=_str_list(obj, "big-data-names"),
            big_data_digests=_str_dict(obj, "big-data-digests"),
            big_data_sizes=_str_dict(obj, "big-data-sizes"),
            created=_opt_str(obj, "created"),
            raw=obj,
        )


def load_json_array(path: Path, *, missing_ok: bool) -> list[Any]:
    """Read a store's JSON array file; a missing file is an empty list when `missing_ok`."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return []
        raise UserError(f"{path}: missing") from None
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from e
    if not data.strip():
        return []
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, list):
        raise UserError(f"{path}: expected a JSON array")
    return value
