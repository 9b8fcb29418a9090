"""Files of derived data under `<repo>/cache/` (the layer cache, the tree cache): written whole under
a temporary name and renamed into place, without an fsync (a torn file fails its own checksum and
is a miss); the directories root only, as objects/. A repository that cannot take the file just
has no cache: never an error."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

TMP_PREFIX = ".tmp-"


def write(directory: Path, name: str, content: bytes) -> None:
    """Put `content` at directory/name. Not through tempfile: the tree cache writes from a forked
    child, where a module lock another thread of the parent held at the fork is never released."""
    try:
        directory.parent.mkdir(exist_ok=True, mode=0o700)
        directory.mkdir(exist_ok=True, mode=0o700)
        tmp = directory / f"{TMP_PREFIX}{os.getpid()}-{os.urandom(6).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            os.replace(tmp, directory / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:
        pass
