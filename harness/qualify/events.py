"""Events from a pytest run to the qualify command: one JSON object per line, appended by the
qualify pytest plugin (pytest's controller process only, so one writer) and tailed by the command.

Kinds: `collected` (nodeids), `start` (nodeid), `phase` (nodeid, when, outcome, duration, message,
worker, props: what the worker attached to the report), `finish` (exitstatus). Every event has `t`
(UNIX time)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

ENV = "BOOTC_UNIFIED_QUALIFY_EVENTS"


def emit(path: Path, kind: str, **fields: Any) -> None:
    line = json.dumps({"event": kind, "t": time.time(), **fields}, default=str) + "\n"
    # one write of one line with O_APPEND: a reader never sees half of it followed by another
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class Tail:
    """Reads the complete lines appended to `path` since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]


def read_all(path: Path) -> list[dict[str, Any]]:
    return Tail(path).read()
