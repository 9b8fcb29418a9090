"""A user's own images in the qualification (`bootc-unified-qualify --image REF --update-image REF`):
they stand in for the built-in guest images `v1` (and `v2`) of the scenarios that take them. The
image is copied with skopeo into the session's test registry under the name the scenario pulls
(installed.REFERENCES), so the scenario runs exactly as on the built-in one; the scenario's
image-specific checks (files the built-in images are known to contain) are skipped for it, the
generic ones (boots from composefs, status JSON, zero-copy, `podman run <booted image>`) run.

A user's image must derive from our base image (it contains this checkout's bootc-unified and the
harness's SSH key): the installer VM runs `bootc-unified install` from it, the installed system is
reached over SSH.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from dataclasses import dataclass
from urllib.parse import urlsplit

TRANSPORTS = ("docker://", "containers-storage:", "oci:", "oci-archive:", "docker-archive:", "dir:")
LOCAL_REGISTRIES = ("127.0.0.1", "localhost", "::1")


class UserImageError(Exception):
    """The user's image cannot be read or copied: one line naming it and skopeo's reason."""


def with_transport(ref: str) -> str:
    """`quay.io/x/y:tag` -> `docker://quay.io/x/y:tag`; a ref with a skopeo transport as it is."""
    return ref if ref.startswith(TRANSPORTS) else f"docker://{ref}"


def _insecure(ref: str) -> bool:
    """A registry on this host (the test registry, a developer's own) speaks plain HTTP."""
    if not ref.startswith("docker://"):
        return False
    host = urlsplit(ref).hostname or ""
    return host in LOCAL_REGISTRIES


def _skopeo(args: list[str], what: str) -> bytes:
    proc = subprocess.run(["skopeo", *args], capture_output=True, timeout=1800)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        last = lines[-1] if lines else f"skopeo exit {proc.returncode}"
        msg = re.search(r'msg="((?:[^"\\]|\\.)*)"', last)  # logrus: time=... level=fatal msg="..."
        reason = msg.group(1).replace('\\"', '"') if msg else last
        raise UserImageError(f"{what}: {reason}")
    return proc.stdout


@dataclass(frozen=True)
class UserImage:
    ref: str  # with its transport
    image_id: str  # sha256 of the config, as podman names the image (no sha256: prefix)
    layers: list[str]  # DiffIDs, base first


def inspect(ref: str) -> UserImage:
    """The image's ID and DiffIDs from its config, as skopeo reads it (no copy yet)."""
    full = with_transport(ref)
    tls = ["--tls-verify=false"] if _insecure(full) else []
    config = _skopeo(["inspect", *tls, "--config", "--raw", full], f"image {ref}")
    try:
        diff_ids = list(json.loads(config)["rootfs"]["diff_ids"])
    except (ValueError, KeyError, TypeError):
        raise UserImageError(f"image {ref}: its config has no rootfs.diff_ids") from None
    return UserImage(full, hashlib.sha256(config).hexdigest(), diff_ids)


def copy(image: UserImage, registry_address: str, reference: str) -> str:
    """Copy the image into the registry at `registry_address` (host:port, plain HTTP) as
    `reference` (repo:tag); returns `host:port/repo:tag`."""
    dest = f"{registry_address}/{reference}"
    tls = ["--src-tls-verify=false"] if _insecure(image.ref) else []
    _skopeo(
        ["copy", "--quiet", *tls, "--dest-tls-verify=false", image.ref, f"docker://{dest}"],
        f"copying image {image.ref} to the test registry",
    )
    return dest
