"""The kernel command line: split and join (with quotes), and the `composefs=[?]<id>` argument.

`?` in front of the id means fs-verity is optional for that deployment (composefs-rs
`crates/composefs-boot/src/cmdline.rs`; bootc writes `composefs=?<id>` for --allow-missing-verity).
Splitting follows the kernel: whitespace separates, double quotes group (and are kept, as the
kernel keeps them in /proc/cmdline).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bootc_unified.errors import UserError

KARG = "composefs"
PROC_CMDLINE = Path("/proc/cmdline")
_HEX = re.compile(r"[0-9a-f]{64}|[0-9a-f]{128}")


@dataclass(frozen=True)
class ComposefsArg:
    digest: str  # the deployment id: the EROFS image's fs-verity digest (hex)
    insecure: bool = False  # `?`: fs-verity optional

    def __str__(self) -> str:
        return format_composefs(self.digest, self.insecure)


def format_composefs(digest: str, insecure: bool = False) -> str:
    return f"{KARG}={'?' if insecure else ''}{digest}"


def parse_composefs_value(value: str, where: str = "composefs=") -> ComposefsArg:
    insecure = value.startswith("?")
    digest = value.removeprefix("?")
    if not _HEX.fullmatch(digest):
        raise UserError(f"{where}: {value!r} is not a sha256/sha512 hex digest (optionally after '?')")
    return ComposefsArg(digest, insecure)


def split_cmdline(text: str) -> list[str]:
    """Arguments as the kernel sees them: split on whitespace outside double quotes."""
    args: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch.isspace() and not quoted:
            if current:
                args.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        args.append("".join(current))
    return args


def join_cmdline(args: Iterable[str]) -> str:
    """One line; an argument with whitespace gets its value (or itself) double-quoted."""
    out = []
    for arg in args:
        if any(c.isspace() for c in arg) and '"' not in arg:
            key, eq, value = arg.partition("=")
            arg = f'{key}="{value}"' if eq else f'"{arg}"'
        out.append(arg)
    return " ".join(out)


def key_value(arg: str) -> tuple[str, str | None]:
    key, eq, value = arg.partition("=")
    return key, (value.strip('"') if eq else None)


def parse_composefs(args: Sequence[str] | str, where: str = "kernel command line") -> ComposefsArg | None:
    """The (last) `composefs=` argument, or None when there is none."""
    if isinstance(args, str):
        args = split_cmdline(args)
    found: ComposefsArg | None = None
    for arg in args:
        key, value = key_value(arg)
        if key == KARG and value is not None:
            found = parse_composefs_value(value, f"{where}: {arg}")
    return found


def replace_composefs(args: Sequence[str], new: ComposefsArg) -> list[str]:
    """`args` with the first composefs= replaced in place by `new` (others dropped; appended when
    there was none)."""
    out: list[str] = []
    for arg in args:
        if key_value(arg)[0] != KARG:
            out.append(arg)
        elif str(new) not in out:
            out.append(str(new))
    return out if str(new) in out else [*out, str(new)]


def read_proc_cmdline(path: Path = PROC_CMDLINE) -> list[str]:
    try:
        return split_cmdline(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from e
