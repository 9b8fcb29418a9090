"""Explicit subprocess calls with errors that name the command."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path


class CommandError(RuntimeError):
    def __init__(self, argv: Sequence[str | Path], returncode: int, stderr: str) -> None:
        self.argv = [str(a) for a in argv]
        self.returncode = returncode
        self.stderr = stderr
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "(no output)"
        super().__init__(f"{shlex.join(self.argv)} failed with exit code {returncode}: {last}")


def run(
    argv: Sequence[str | Path],
    *,
    check: bool = True,
    capture: bool = True,
    input: bytes | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise CommandError with its last stderr line."""
    proc = subprocess.run(
        [str(a) for a in argv],
        input=input.decode() if input is not None else None,
        capture_output=capture,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr or "")
    return proc
