"""Repository locking: flock on the repository directory itself.

Writers of objects, streams and refs share the lock; GC takes it exclusively, so it never sees a
half-published import.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path


@contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def shared(path: Path) -> AbstractContextManager[None]:
    return _flock(path, fcntl.LOCK_SH)


def exclusive(path: Path) -> AbstractContextManager[None]:
    return _flock(path, fcntl.LOCK_EX)
