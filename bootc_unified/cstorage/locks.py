"""Shared (read) locks on a containers-storage's lock files, the way containers/storage takes them.

containers/storage guards layers.json with overlay-layers/layers.lock and images.json with
overlay-images/images.lock: POSIX record locks (fcntl F_SETLKW) over the whole file, F_RDLCK for
readers and F_WRLCK for writers. Its writers lock the layer store before the image store, so we
take them in the same order. The files are opened read-only: reading never creates or writes
anything in the store.

POSIX locks belong to the process: closing any descriptor of a lock file drops the lock, so only
this module opens them.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from bootc_unified.errors import UserError

LAYERS_LOCK = "overlay-layers/layers.lock"
IMAGES_LOCK = "overlay-images/images.lock"


@dataclass
class _Held:
    fd: int
    count: int


_held: dict[str, _Held] = {}
_guard = threading.Lock()


@contextmanager
def read_lock(path: Path) -> Iterator[None]:
    """Hold a shared fcntl lock on `path` (waits while a writer holds it).

    Re-entrant within the process: nested holders share one descriptor, which is closed (and the
    lock released) when the outermost holder leaves.
    """
    key = os.path.abspath(path)
    with _guard:
        held = _held.get(key)
        if held is not None:
            held.count += 1
        else:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise UserError(f"{path}: lock file missing (not an overlay containers-storage?)") from None
            except OSError as e:
                raise UserError(f"{path}: cannot open lock file: {e.strerror}") from e
            try:
                fcntl.lockf(fd, fcntl.LOCK_SH)
            except BaseException:
                os.close(fd)
                raise
            _held[key] = _Held(fd, 1)
    try:
        yield
    finally:
        with _guard:
            held = _held[key]
            held.count -= 1
            if held.count == 0:
                del _held[key]
                os.close(held.fd)  # releases the lock


@contextmanager
def store_read_lock(root: Path, *, images: bool = True) -> Iterator[None]:
    """Shared locks on the layer store and (optionally) the image store of `root`, in that order."""
    with ExitStack() as stack:
        stack.enter_context(read_lock(root / LAYERS_LOCK))
        if images:
            stack.enter_context(read_lock(root / IMAGES_LOCK))
        yield
