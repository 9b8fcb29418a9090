"""Timing for bench/: the best of several runs of the same work, in this process."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(repeat: int, fn: Callable[[], object], warmup: bool = False) -> float:
    """The shortest of `repeat` timed calls of `fn` (after one untimed call with `warmup`)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
