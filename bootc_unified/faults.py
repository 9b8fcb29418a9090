"""Named crash points for crash-safety tests.

A crash between two syscalls cannot be caused from outside with any precision, so tests set
BOOTC_UNIFIED_CRASH_AT=<point>[:<n>] and the process kills itself with SIGKILL (a real, uncatchable
kill) the n-th time (default: first) it reaches that point. The variable is read once, when this
module is imported (the tests set it in the environment of the process they start): unset,
`point()` costs one test of a global, on paths that reach a point once per file.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "BOOTC_UNIFIED_CRASH_AT"
_hits: dict[str, int] = {}
_lock = threading.Lock()  # points are reached from worker threads too
_SPEC = os.environ.get(ENV, "")


def point(name: str) -> None:
    if not _SPEC:
        return
    target, _, nth = _SPEC.partition(":")
    if target != name:
        return
    with _lock:
        _hits[name] = hits = _hits.get(name, 0) + 1
    if hits >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
