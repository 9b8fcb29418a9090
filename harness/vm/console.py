"""Serial console checks. Trouble on the console fails the test and the error names the line: a
kernel panic, Oops, BUG, WARNING or call trace, a hung task, an RCU stall, a filesystem error
(ext4, btrfs, XFS corruption), a failed systemd unit, an emergency/rescue/initramfs shell. The
patterns follow kola's `consoleChecks` (coreos-assembler mantle/kola/harness.go).

The log itself is evidence too: a VM that was started must have one (a missing log fails), and
every boot must show the kernel banner. The log is appended to across the QEMU restarts that
reboots cause (`append=on` on both backends, see machine.py), so a machine booted N times shows N
banners; fewer means a boot never reached the kernel, more means a kernel the harness did not start.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;?=]*[A-Za-z]")

# A kernel message line as the serial console shows it: "[   12.345678] ...".
_KMSG = r"^\[ *\d+\.\d+\] "

PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("kernel panic", re.compile(r"Kernel panic - not syncing")),
    ("kernel Oops", re.compile(r"\bOops(: | - |#)")),
    ("kernel BUG", re.compile(r"\bBUG: |kernel BUG at ")),
    # WARN(): "------------[ cut here ]------------", then "WARNING: CPU: 0 PID: 1 at ..."; lockdep
    # and RCU debugging print "WARNING: <what>" as a kernel message of its own.
    (
        "kernel WARNING",
        re.compile(r"-+\[ cut here \]-+|\bWARNING: CPU: \d+ PID: \d+|" + _KMSG + r"WARNING: "),
    ),
    ("kernel call trace", re.compile(r"\bCall Trace:")),
    ("hung task", re.compile(r"\bblocked for more than \d+ seconds")),
    ("RCU stall", re.compile(r"\brcu_\w+ (self-)?detected stall")),
    (
        "ext4 error",
        re.compile(r"\bEXT4-fs error\b|\bEXT4-fs \([^)]+\): Delayed block allocation failed"),
    ),
    ("btrfs error", re.compile(r"\bBTRFS:? (error|critical)\b")),
    ("XFS corruption", re.compile(r"\bXFS \([^)]+\): (.*\b[Cc]orruption\b|Internal error)")),
    ("systemd unit failed", re.compile(r"\[FAILED\] |\[DEPEND\] Dependency failed")),
    ("systemd ordering cycle", re.compile(r"\b[Oo]rdering cycle (found|on )|to break ordering cycle")),
    ("out of memory", re.compile(r"\binvoked oom-killer\b")),
    (
        "emergency shell",
        re.compile(
            r"You are in emergency mode|Entering emergency mode|emergency\.target|Starting Emergency Shell"
        ),
    ),
    ("rescue shell", re.compile(r"You are in rescue mode|Entering rescue mode|rescue\.target")),
    ("initramfs shell", re.compile(r"Dropping to a shell|^\(initramfs\) ")),
]

# The kernel's first line on the console (printed at KERN_NOTICE: `quiet` would hide it, and the
# guest images do not boot with `quiet`).
BANNER = re.compile(r"\bLinux version \d")


@dataclass(frozen=True)
class Finding:
    what: str
    line_number: int
    line: str

    def __str__(self) -> str:
        return f"{self.what} at console line {self.line_number}: {self.line.strip()}"


class ConsoleError(AssertionError):
    def __init__(self, path: Path, findings: list[Finding], problems: list[str] | None = None) -> None:
        self.path = path
        self.findings = findings
        self.problems = problems or []
        listed = "\n  ".join([*self.problems, *(str(f) for f in findings[:10])])
        super().__init__(f"serial console {path} shows trouble:\n  {listed}")


def _lines(text: str) -> list[str]:
    return [ANSI.sub("", raw).replace("\r", "") for raw in text.splitlines()]


def scan(
    text: str, accepted: Sequence[range] = (), accepted_lines: Sequence[re.Pattern[str]] = ()
) -> list[Finding]:
    """Trouble on the console; lines whose number is in one of `accepted` (trouble a test caused
    on purpose and asserted itself, Machine.trouble_expected) or that match one of
    `accepted_lines` (Machine.expect_console_lines) are not trouble."""
    findings = []
    for number, line in enumerate(_lines(text), start=1):
        if any(number in r for r in accepted) or any(p.search(line) for p in accepted_lines):
            continue
        for what, pattern in PATTERNS:
            if pattern.search(line):
                findings.append(Finding(what, number, line))
                break
    return findings


def banners(text: str) -> int:
    """How many kernels started on this console (lines with the "Linux version ..." banner)."""
    return sum(1 for line in _lines(text) if BANNER.search(line))


def line_count(text: str) -> int:
    return len(_lines(text))


def check(
    path: Path,
    boots: int | None = None,
    accepted: Sequence[range] = (),
    accepted_lines: Sequence[re.Pattern[str]] = (),
) -> None:
    """Raise ConsoleError when the console log at `path` is missing, shows trouble (outside the
    `accepted` line ranges), or (with `boots`) does not show exactly one kernel banner per boot."""
    if not path.is_file():
        raise ConsoleError(path, [], ["the serial console log is missing (the VM wrote nothing to it)"])
    text = path.read_text(errors="replace")
    problems = []
    if boots is not None:
        seen = banners(text)
        if seen != boots:
            why = "a boot never reached the kernel" if seen < boots else "a kernel the harness did not boot"
            problems.append(
                f"{seen} kernel banner(s) ('Linux version ...') for {boots} boot(s) of this VM: {why}"
            )
    findings = scan(text, accepted, accepted_lines)
    if problems or findings:
        raise ConsoleError(path, findings, problems)
