"""The C library, for the calls Python's os module lacks (syncfs, renameat2, unshare, prctl).

Loaded once per process: `ctypes.util.find_library` runs `ldconfig -p` each time it is asked, which
costs milliseconds and, in a child between fork and exec, widens every race it sits in."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
