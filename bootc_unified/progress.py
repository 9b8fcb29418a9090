"""Progress reporting: bootc's JSON-lines protocol on a file descriptor, and a rich display on a TTY.

The JSON shapes are bootc's (`progress_jsonl.rs`, protocol version 0.1.0): every line is one object
with a `type` of `Start`, `ProgressBytes` or `ProgressSteps`, fields in camelCase. The first line is
always `{"type": "Start", "version": "0.1.0"}`. Intermediate `ProgressBytes` updates are rate-limited
(5 per second, like bootc); the first and the final update of a task are always written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

API_VERSION = "0.1.0"
REFRESH_SECONDS = 1 / 5


@dataclass(frozen=True)
class SubTaskBytes:
    subtask: str  # machine-readable kind, e.g. "layer"
    description: str
    id: str  # e.g. the layer digest
    bytes_cached: int = 0
    bytes: int = 0
    bytes_total: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "subtask": self.subtask,
            "description": self.description,
            "id": self.id,
            "bytesCached": self.bytes_cached,
            "bytes": self.bytes,
            "bytesTotal": self.bytes_total,
        }


@dataclass(frozen=True)
class SubTaskStep:
    subtask: str
    description: str
    id: str
    completed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "subtask": self.subtask,
            "description": self.description,
            "id": self.id,
            "completed": self.completed,
        }


@dataclass(frozen=True)
class ProgressBytes:
    task: str  # machine-readable, e.g. "pulling"
    description: str
    id: str  # e.g. the image reference
    bytes_cached: int = 0
    bytes: int = 0
    bytes_total: int = 0
    steps_cached: int = 0
    steps: int = 0
    steps_total: int = 0
    subtasks: Sequence[SubTaskBytes] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "ProgressBytes",
            "task": self.task,
            "description": self.description,
            "id": self.id,
            "bytesCached": self.bytes_cached,
            "bytes": self.bytes,
            "bytesTotal": self.bytes_total,
            "stepsCached": self.steps_cached,
            "steps": self.steps,
            "stepsTotal": self.steps_total,
            "subtasks": [s.to_json() for s in self.subtasks],
        }

    @property
    def done(self) -> bool:
        return self.steps >= self.steps_total and self.bytes >= self.bytes_total


@dataclass(frozen=True)
class ProgressSteps:
    task: str
    description: str
    id: str
    steps_cached: int = 0
    steps: int = 0
    steps_total: int = 0
    subtasks: Sequence[SubTaskStep] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "ProgressSteps",
            "task": self.task,
            "description": self.description,
            "id": self.id,
            "stepsCached": self.steps_cached,
            "steps": self.steps,
            "stepsTotal": self.steps_total,
            "subtasks": [s.to_json() for s in self.subtasks],
        }

    @property
    def done(self) -> bool:
        return self.steps >= self.steps_total


Event = ProgressBytes | ProgressSteps


class Progress(Protocol):
    def send(self, event: Event, required: bool = False) -> None:
        """Report `event`; `required` events are never dropped by rate limiting."""

    def close(self) -> None: ...


class NullProgress:
    def send(self, event: Event, required: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


class JsonLinesProgress:
    """bootc's protocol on a writable stream: Start first, then one JSON object per line."""

    def __init__(self, stream: IO[str], clock: Any = time.monotonic) -> None:
        self._stream: IO[str] | None = stream
        self._clock = clock
        self._sent_start = False
        self._last_write: float | None = None

    @classmethod
    def from_fd(cls, fd: int) -> JsonLinesProgress:
        if fd in (0, 1, 2):
            raise ValueError(f"cannot use fd {fd} for progress JSON")
        return cls(os.fdopen(fd, "w", buffering=1, closefd=True))

    def _write(self, obj: dict[str, Any]) -> None:
        assert self._stream is not None
        self._stream.write(json.dumps(obj, separators=(",", ":"), sort_keys=True) + "\n")
        self._stream.flush()

    def send(self, event: Event, required: bool = False) -> None:
        if self._stream is None:
            return
        try:
            if not self._sent_start:
                self._sent_start = True
                self._write({"type": "Start", "version": API_VERSION})
            now = self._clock()
            lossy = not required and not event.done
            if lossy and self._last_write is not None and now - self._last_write < REFRESH_SECONDS:
                return
            self._write(event.to_json())
            self._last_write = now
        except OSError as e:
            # Like bootc: stop writing to the fd but let the operation continue.
            print(f"bootc-unified: progress fd: {e.strerror}; no more progress output", file=sys.stderr)
            self._stream = None

    def close(self) -> None:
        if self._stream is not None:
            try:
                if not self._sent_start:
                    self._sent_start = True
                    self._write({"type": "Start", "version": API_VERSION})
                self._stream.close()
            except OSError:
                pass
            self._stream = None


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


class RichProgress:
    """A live display on a terminal: one bar for the task, one per subtask (layer)."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._tasks: dict[str, Any] = {}
        self._started = False

    def _task(self, key: str, description: str, total: int) -> Any:
        if not self._started:
            self._progress.start()
            self._started = True
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task(description, total=total or None)
        return self._tasks[key]

    def send(self, event: Event, required: bool = False) -> None:
        if isinstance(event, ProgressBytes):
            top = self._task(event.id, f"{event.description} {_short(event.id)}", event.bytes_total)
            self._progress.update(top, completed=event.bytes, total=event.bytes_total or None)
            for sub in event.subtasks:
                t = self._task(f"{event.id}/{sub.id}", f"  {sub.description} {sub.id[:19]}", sub.bytes_total)
                self._progress.update(t, completed=sub.bytes, total=sub.bytes_total or None)
        else:
            top = self._task(event.id, f"{event.description} {_short(event.id)}", event.steps_total)
            self._progress.update(top, completed=event.steps, total=event.steps_total or None)

    def close(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False


class MultiProgress:
    def __init__(self, sinks: Sequence[Progress]) -> None:
        self._sinks = list(sinks)

    def send(self, event: Event, required: bool = False) -> None:
        for s in self._sinks:
            s.send(event, required)

    def close(self) -> None:
        for s in self._sinks:
            s.close()


def for_cli(progress_fd: int | None, tty: bool | None = None) -> Progress:
    """The progress sinks a command uses: JSON lines on `progress_fd`, and rich when stderr is a TTY."""
    sinks: list[Progress] = []
    if progress_fd is not None:
        sinks.append(JsonLinesProgress.from_fd(progress_fd))
    if tty if tty is not None else sys.stderr.isatty():
        sinks.append(RichProgress())
    if not sinks:
        return NullProgress()
    return sinks[0] if len(sinks) == 1 else MultiProgress(sinks)
