"""Named crash points for crash-safety tests.

A crash between two syscalls cannot be caused from outside with any precision, so tests set
BOOTC_UNIFIED_CRASH_AT=<point>[:<n>] and the process kills itself with SIGKILL (a real, uncatchable
kill) the n-th time (default: first) it reaches that point. Unset, `point()` costs a dict lookup.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "BOOTC_UNIFIED_CRASH_AT"
_hits: dict[str, int] = {}
_lock = threading.Lock()  # points are reached from worker threads too


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    with _lock:
        _hits[name] = hits = _hits.get(name, 0) + 1
    if hits >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
