"""One deployment verb at a time per sysroot: an exclusive flock on the sysroot directory.

bootc (through ostree-ext's `SysrootLock`) takes the sysroot lock for upgrade, switch, rollback,
finalize and GC; when another process holds it, it says "Waiting for sysroot lock..." once and
waits. Here the same: upgrade/switch (update.py, upgrade.py `--from-downloaded`), rollback,
finalize-staged, `internals gc` and `image set-unified` hold it for their whole run, so GC never
sees a half-staged deployment (whose fresh ref and store image it would otherwise remove) and two
updates never stage over each other.

The lock is re-entrant within a process (update runs the GC while holding it): a second `locked()`
on the same sysroot in the same process only counts. flock works on a read-only mount, so a booted
system's read-only /sysroot can be locked before it is made writable.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bootc_unified.errors import UserError

WAITING = "Waiting for sysroot lock..."

_held: dict[str, int] = {}  # realpath -> depth, for this process


@contextmanager
def locked(sysroot: Path) -> Iterator[None]:
    """Hold the sysroot's lock (waiting for it, with one line on stderr, when another has it)."""
    key = os.path.realpath(sysroot)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    try:
        fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise UserError(f"{sysroot}: cannot lock the sysroot: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"bootc-unified: {WAITING}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)  # drops the lock
