"""The kernel's table of file locks (/proc/locks): who holds, and who waits for, a lock on a file.

Each line is `ID: [-> ]CLASS MANDATORY|ADVISORY READ|WRITE PID MAJ:MIN:INODE START END`; a `->`
marks a request that is blocked waiting for the lock of the line above it. Used as the oracle that
a process is really blocked on a lock (not just slow), with a deadline instead of a fixed sleep.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LockEntry:
    kind: str  # FLOCK, POSIX, OFDLCK, LEASE
    mode: str  # READ or WRITE
    pid: int
    inode: int
    blocked: bool  # a waiting request ("->"), not a held lock


def lock_table(text: str | None = None) -> list[LockEntry]:
    """The entries of /proc/locks (or of `text` in its format)."""
    if text is None:
        text = Path("/proc/locks").read_text()
    entries = []
    for line in text.splitlines():
        fields = line.split()[1:]
        blocked = bool(fields) and fields[0] == "->"
        if blocked:
            fields = fields[1:]
        if len(fields) < 5:
            continue
        kind, _advisory, mode, pid, where = fields[:5]
        pid_value = int(pid) if pid.lstrip("-").isdigit() else -1  # OFD locks show -1
        entries.append(LockEntry(kind, mode, pid_value, int(where.rsplit(":", 1)[1]), blocked))
    return entries


def inode_of(path: Path) -> int:
    return os.stat(path).st_ino


def wait_until_blocked(proc: subprocess.Popen[bytes], files: list[Path], timeout: float = 60.0) -> LockEntry:
    """Wait until /proc/locks shows `proc` waiting for a lock on one of `files`; returns that entry.

    Fails (AssertionError) when `proc` exits first or the deadline passes.
    """
    inodes = {inode_of(f) for f in files}
    deadline = time.monotonic() + timeout
    while True:
        for entry in lock_table():
            if entry.blocked and entry.pid == proc.pid and entry.inode in inodes:
                return entry
        if proc.poll() is not None:
            raise AssertionError(
                f"pid {proc.pid} exited with {proc.returncode} without waiting for a lock on "
                f"{', '.join(map(str, files))}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(
                f"pid {proc.pid} did not wait for a lock on {', '.join(map(str, files))} within {timeout} s"
            )
        time.sleep(0.01)


def holds_lock(pid: int, files: list[Path]) -> LockEntry | None:
    """The lock `pid` holds (granted, not waiting) on one of `files`, if any."""
    inodes = {inode_of(f) for f in files}
    for entry in lock_table():
        if not entry.blocked and entry.pid == pid and entry.inode in inodes:
            return entry
    return None


class LockWatch:
    """Samples /proc/locks in a background thread (a context manager), keeping for each sample the
    entries on `files`: who held, and who waited for, their locks at that moment."""

    def __init__(self, files: list[Path], interval: float = 0.002) -> None:
        self.inodes = {inode_of(f) for f in files}
        self.interval = interval
        self.samples: list[list[LockEntry]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lock-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append([e for e in lock_table() if e.inode in self.inodes])
            self._stop.wait(self.interval)

    def __enter__(self) -> LockWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def contended(self, holder: int, waiter: int) -> list[LockEntry]:
        """The samples' blocked requests of `waiter` on a file `holder` held a WRITE lock on at
        that same moment."""
        found = []
        for entries in self.samples:
            written = {e.inode for e in entries if e.pid == holder and not e.blocked and e.mode == "WRITE"}
            found += [e for e in entries if e.pid == waiter and e.blocked and e.inode in written]
        return found
