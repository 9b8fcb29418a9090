"""Named links in the repository: streams/<content-id>, streams/refs/..., images/<id>, images/refs/...

Every link is relative and replaced atomically (a symlink under a temporary name, then rename).
Temporary names start with ".tmp-"; a crash can leave one behind, which fsck ignores and GC removes.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from bootc_unified import faults

TMP_PREFIX = ".tmp-"


def escape_ref(name: str) -> str:
    """A ref name as one path component: `%` -> `%25`, `/` -> `%2F` (composefs-rs's escaping)."""
    return name.replace("%", "%25").replace("/", "%2F")


def unescape_ref(component: str) -> str:
    return component.replace("%2F", "/").replace("%25", "%")


def replace_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` atomically (creating parent directories)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.parent / f"{TMP_PREFIX}{secrets.token_hex(8)}"
    os.symlink(target, tmp)
    faults.point("link-before-rename")
    try:
        os.rename(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def relative_target(link: Path, dest: Path) -> str:
    return os.path.relpath(dest, link.parent)


def resolve(link: Path) -> Path | None:
    """Where a chain of links ends, or None when it is broken or not a link."""
    if not link.is_symlink():
        return None
    target = link.resolve()
    return target if target.exists() else None


def object_id_of(link: Path, objects_dir: Path) -> str | None:
    """The object ID a link (chain) ends at, or None when broken or pointing outside objects/."""
    target = resolve(link)
    if target is None:
        return None
    try:
        rel = target.relative_to(objects_dir.resolve())
    except ValueError:
        return None
    parts = rel.parts
    if len(parts) != 2 or len(parts[0]) != 2:
        return None
    return parts[0] + parts[1]


def links_under(directory: Path, with_tmp: bool = False) -> list[Path]:
    """Every symlink below `directory` (links to directories included), sorted; the temporary links a
    crash can leave behind only `with_tmp`."""
    found = []
    for dirpath, dirs, files in os.walk(directory):
        for name in [*files, *(d for d in dirs if Path(dirpath, d).is_symlink())]:
            path = Path(dirpath, name)
            if path.is_symlink() and (with_tmp or not name.startswith(TMP_PREFIX)):
                found.append(path)
    return sorted(found)
