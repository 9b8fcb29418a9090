"""os-release (`usr/lib/os-release`, else `etc/os-release`) of an image: the BLS entry's os id,
title and version (composefs-rs `crates/composefs-boot/src/os_release.rs`).

    os_id   = ID, default "bootc"
    title   = PRETTY_NAME, else NAME, else ID, else the deployment id
    version = VERSION_ID, else VERSION, else the deployment id
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from bootc_unified.errors import UserError

PATHS = (Path("usr/lib/os-release"), Path("etc/os-release"))


def parse(text: str) -> dict[str, str]:
    """KEY=value lines with shell quoting; comments and malformed lines are ignored."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        try:
            words = shlex.split(value)
        except ValueError:
            continue
        out[key.strip()] = " ".join(words)
    return out


@dataclass(frozen=True)
class OsRelease:
    fields: dict[str, str]

    @classmethod
    def from_root(cls, root: Path) -> OsRelease:
        for rel in PATHS:
            path = root / rel
            if path.is_file() or path.is_symlink():
                target = path
                if path.is_symlink():  # etc/os-release -> ../usr/lib/os-release, resolved inside root
                    link = Path(path.readlink())
                    target = root / link.relative_to("/") if link.is_absolute() else path.parent / link
                try:
                    return cls(parse(target.read_text(errors="replace")))
                except OSError as e:
                    raise UserError(f"{path}: {e.strerror}") from e
        return cls({})

    @property
    def os_id(self) -> str:
        return self.fields.get("ID") or "bootc"

    def title(self, fallback: str) -> str:
        return self.fields.get("PRETTY_NAME") or self.fields.get("NAME") or self.fields.get("ID") or fallback

    def version(self, fallback: str) -> str:
        return self.fields.get("VERSION_ID") or self.fields.get("VERSION") or fallback
