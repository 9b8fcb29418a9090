"""Repair what a power cut leaves in a containers-storage overlay store.

containers-storage records a layer (layers.json, written atomically and synced) before the small
files of its directory reach the disk: after a power cut right after a pull, a layer can be
recorded whole while its `link` file (the short name of its `l/` symlink) and its `lower` file
(the `l/` names of its parents, uppermost first: containers-storage-driver-overlay(5)) are empty.
podman then fails on every image standing on it ("readlink .../overlay: invalid argument").
`repair_links` rewrites exactly those two files from what survived (the `l/` symlink that points at
the layer, the parents' `link` files); podman >= 5 also gets `podman system check --repair`, which
checks layer contents too (the caller runs it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.repair")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return False


def repair_links(root: Path) -> list[str]:
    """Rewrite empty `link`/`lower` files of the store at `root`; returns what was rewritten
    (paths relative to `root`). A layer whose `l/` symlink is gone too is left alone."""
    overlay = root / "overlay"
    if not (overlay / "l").is_dir():
        return []
    short = {}  # layer id -> its l/ name, from the symlinks (`l/NAME -> ../<id>/diff`)
    for entry in os.scandir(overlay / "l"):
        target = os.readlink(entry.path) if entry.is_symlink() else ""
        parts = target.split("/")
        if len(parts) == 3 and parts[0] == ".." and parts[2] == "diff":
            short[parts[1]] = entry.name
    fixed = []
    for layer, name in short.items():
        link = overlay / layer / "link"
        if _empty(link):
            _write(link, name)
            fixed.append(f"overlay/{layer}/link")
    try:
        records = json.loads((root / "overlay-layers/layers.json").read_text())
    except (OSError, ValueError):
        return fixed
    parent = {r["id"]: r.get("parent") for r in records if isinstance(r, dict) and "id" in r}
    for layer in parent:
        lower = overlay / layer / "lower"
        if not _empty(lower):
            continue
        chain, up = [], parent.get(layer)
        while up:
            if up not in short:
                break
            chain.append(f"l/{short[up]}")
            up = parent.get(up)
        else:
            if chain:
                _write(lower, ":".join(chain))
                fixed.append(f"overlay/{layer}/lower")
    return fixed
