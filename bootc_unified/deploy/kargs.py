"""Kernel arguments an image ships in `/usr/lib/bootc/kargs.d/*.toml` (bootc `bootc_kargs.rs`).

    kargs = ["console=ttyS0", "quiet"]        # required
    match-architectures = ["x86_64"]          # optional (Rust arch names); other arches skip the file

Files are read in sorted name order; unknown keys are rejected. A file that cannot be read or
parsed is a one-line UserError naming it.
"""

from __future__ import annotations

import platform
import tomllib
from pathlib import Path

from bootc_unified.errors import UserError

KARGS_D = Path("usr/lib/bootc/kargs.d")
KEYS = {"kargs", "match-architectures"}


def rust_arch() -> str:
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def parse_file(path: Path, arch: str) -> list[str]:
    """The kargs of one kargs.d file, or [] when its match-architectures excludes `arch`."""
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read kargs file ({e.strerror})") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML ({e})") from e
    unknown = sorted(set(doc) - KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (allowed: kargs, match-architectures)")
    kargs = doc.get("kargs")
    if not isinstance(kargs, list) or not all(isinstance(k, str) for k in kargs):
        raise UserError(f"{path}: `kargs` must be a list of strings")
    arches = doc.get("match-architectures")
    if arches is not None:
        if not isinstance(arches, list) or not all(isinstance(a, str) for a in arches):
            raise UserError(f"{path}: `match-architectures` must be a list of strings")
        if arch not in arches:
            return []
    return list(kargs)


def from_root(root: Path, arch: str | None = None) -> list[str]:
    """All kargs of the image mounted at `root`, file by file in sorted name order."""
    directory = root / KARGS_D
    if not directory.is_dir():
        return []
    arch = arch or rust_arch()
    out: list[str] = []
    for path in sorted(p for p in directory.iterdir() if p.name.endswith(".toml")):
        out += parse_file(path, arch)
    return out
