"""Find an image in a store's image records by name, digest or ID, the way people type them.

Accepted forms, tried in this order:
- an exact name as stored (`localhost/app:latest`, `quay.io/x/y@sha256:...`);
- a digest `sha256:<64 hex>` (manifest digest; else the image ID with the `sha256:` prefix);
- `NAME@sha256:<hex>`: an image with that manifest digest and a name in repository NAME;
- a full 64-hex image ID;
- a name, qualified or short: `app` (tag defaults to `latest`) matches `localhost/app:latest`,
  `docker.io/library/app:latest`, `quay.io/org/app:latest`: any stored repository ending in `/app`;
- a unique prefix of an image ID (at least 3 hex digits).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from bootc_unified.errors import UserError

from .records import ImageRecord

_HEX = re.compile(r"[0-9a-f]+")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class ImageNotFound(UserError):
    pass


@dataclass(frozen=True)
class NameRef:
    repository: str  # with domain when the user gave one
    tag: str | None
    digest: str | None

    @property
    def qualified(self) -> bool:
        first, sep, _ = self.repository.partition("/")
        return bool(sep) and ("." in first or ":" in first or first == "localhost")

    @classmethod
    def parse(cls, text: str) -> NameRef:
        name, _, digest = text.partition("@")
        tag = None
        slash = name.rfind("/")
        colon = name.rfind(":")
        if colon > slash:
            name, tag = name[:colon], name[colon + 1 :]
        return cls(name, tag, digest or None)


def _matches_repo(stored: str, wanted: NameRef) -> bool:
    if stored == wanted.repository:
        return True
    return not wanted.qualified and stored.endswith("/" + wanted.repository)


def _unique(found: Sequence[ImageRecord], ref: str) -> ImageRecord | None:
    by_id = {img.id: img for img in found}
    if len(by_id) > 1:
        names = ", ".join(sorted((img.names[0] if img.names else img.id[:12]) for img in by_id.values()))
        raise ImageNotFound(f"image {ref!r} is ambiguous: matches {names}")
    return next(iter(by_id.values()), None)


def find_image(images: Sequence[ImageRecord], ref: str) -> ImageRecord:
    """The one image `ref` names; ImageNotFound (a UserError) if none or several."""
    if not ref:
        raise ImageNotFound("empty image reference")
    for img in images:
        if ref in img.names:
            return img

    if _DIGEST.fullmatch(ref):
        hit = _unique([i for i in images if ref in i.all_digests], ref)
        hit = hit or _unique([i for i in images if i.id == ref[len("sha256:") :]], ref)
        if hit:
            return hit
        raise ImageNotFound(f"image {ref!r} not found in the store")

    wanted = NameRef.parse(ref)
    if wanted.digest is not None:
        if not _DIGEST.fullmatch(wanted.digest):
            raise ImageNotFound(f"image {ref!r}: invalid digest {wanted.digest!r}")
        found = [
            img
            for img in images
            if wanted.digest in img.all_digests
            and any(_matches_repo(NameRef.parse(n).repository, wanted) for n in img.names)
        ]
        hit = _unique(found, ref)
        if hit:
            return hit
        raise ImageNotFound(f"image {ref!r} not found in the store")

    if len(ref) == 64 and _HEX.fullmatch(ref):
        for img in images:
            if img.id == ref:
                return img

    tag = wanted.tag or "latest"
    found = []
    for img in images:
        for name in img.names:
            stored = NameRef.parse(name)
            if stored.tag == tag and _matches_repo(stored.repository, wanted):
                found.append(img)
    hit = _unique(found, ref)
    if hit:
        return hit

    if wanted.tag is None and len(ref) >= 3 and _HEX.fullmatch(ref):
        hit = _unique([img for img in images if img.id.startswith(ref)], ref)
        if hit:
            return hit
    raise ImageNotFound(f"image {ref!r} not found in the store")
