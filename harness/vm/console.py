"""Serial console checks: a kernel panic, Oops, BUG, or an emergency/rescue shell fails the test,
and the error names the line."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;?=]*[A-Za-z]")

PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("kernel panic", re.compile(r"Kernel panic - not syncing")),
    ("kernel Oops", re.compile(r"\bOops(: | - |#)")),
    ("kernel BUG", re.compile(r"\bBUG: |kernel BUG at ")),
    ("emergency shell", re.compile(r"You are in emergency mode|Entering emergency mode|emergency\.target")),
    ("rescue shell", re.compile(r"You are in rescue mode|Entering rescue mode|rescue\.target")),
    ("initramfs shell", re.compile(r"Dropping to a shell|^\(initramfs\) ")),
]


@dataclass(frozen=True)
class Finding:
    what: str
    line_number: int
    line: str

    def __str__(self) -> str:
        return f"{self.what} at console line {self.line_number}: {self.line.strip()}"


class ConsoleError(AssertionError):
    def __init__(self, path: Path, findings: list[Finding]) -> None:
        self.findings = findings
        listed = "\n  ".join(str(f) for f in findings[:10])
        super().__init__(f"serial console {path} shows trouble:\n  {listed}")


def scan(text: str) -> list[Finding]:
    findings = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = ANSI.sub("", raw).replace("\r", "")
        for what, pattern in PATTERNS:
            if pattern.search(line):
                findings.append(Finding(what, number, line))
                break
    return findings


def check(path: Path) -> None:
    """Raise ConsoleError when the console log at `path` shows a panic, Oops, BUG or rescue shell."""
    if not path.exists():
        return
    findings = scan(path.read_text(errors="replace"))
    if findings:
        raise ConsoleError(path, findings)
