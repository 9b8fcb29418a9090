"""The progress writers: bootc's JSON field names, Start first, rate limiting, the rich display."""

from __future__ import annotations

import io
import json
import os

import pytest
from rich.console import Console

from bootc_unified.progress import (
    JsonLinesProgress,
    ProgressBytes,
    ProgressSteps,
    RichProgress,
    SubTaskBytes,
    SubTaskStep,
    for_cli,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def event(done: int, total: int = 10) -> ProgressBytes:
    sub = SubTaskBytes("layer", "Layer", "sha256:aa", 0, done, total)
    return ProgressBytes("pulling", "Pulling", "img", 0, done, total, 0, int(done == total), 1, (sub,))


def lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_shapes_are_bootcs() -> None:
    buf = io.StringIO()
    p = JsonLinesProgress(buf)
    p.send(event(3))
    p.send(
        ProgressSteps("pulling", "Pulling", "img", 1, 2, 3, (SubTaskStep("layer", "Layer", "x", True),)), True
    )
    start, pb, ps = lines(buf)
    assert start == {"type": "Start", "version": "0.1.0"}
    assert pb == {
        "type": "ProgressBytes", "task": "pulling", "description": "Pulling", "id": "img",
        "bytesCached": 0, "bytes": 3, "bytesTotal": 10, "stepsCached": 0, "steps": 0, "stepsTotal": 1,
        "subtasks": [{"subtask": "layer", "description": "Layer", "id": "sha256:aa",
                      "bytesCached": 0, "bytes": 3, "bytesTotal": 10}],
    }  # fmt: skip
    assert ps == {
        "type": "ProgressSteps", "task": "pulling", "description": "Pulling", "id": "img",
        "stepsCached": 1, "steps": 2, "stepsTotal": 3,
        "subtasks": [{"subtask": "layer", "description": "Layer", "id": "x", "completed": True}],
    }  # fmt: skip


def test_rate_limit_drops_only_intermediate_updates() -> None:
    buf = io.StringIO()
    clock = FakeClock()
    p = JsonLinesProgress(buf, clock=clock)
    p.send(event(1))  # first: written
    p.send(event(2))  # within 0.2 s: dropped
    p.send(event(3), required=True)  # required: written
    clock.now += 0.25
    p.send(event(4))  # after the interval: written
    p.send(event(10))  # complete: always written
    assert [e.get("bytes") for e in lines(buf)] == [None, 1, 3, 4, 10]


def test_close_without_events_still_writes_start() -> None:
    r, w = os.pipe()
    JsonLinesProgress.from_fd(w).close()  # closes w
    with os.fdopen(r) as f:
        assert f.read() == '{"type":"Start","version":"0.1.0"}\n'


def test_standard_descriptors_are_refused() -> None:
    for fd in (0, 1, 2):
        with pytest.raises(ValueError, match=f"fd {fd}"):
            JsonLinesProgress.from_fd(fd)


def test_broken_pipe_stops_output_but_not_the_caller(capsys: pytest.CaptureFixture[str]) -> None:
    r, w = os.pipe()
    os.close(r)
    p = JsonLinesProgress.from_fd(w)
    p.send(event(1))  # EPIPE: reported once on stderr, then silence
    p.send(event(10))
    p.close()
    assert capsys.readouterr().err.count("progress fd") == 1


def test_for_cli_without_fd_or_tty_is_silent(capfd: pytest.CaptureFixture[str]) -> None:
    fds_before = set(os.listdir("/proc/self/fd"))
    sink = for_cli(None, tty=False)
    sink.send(event(1))
    sink.send(ProgressSteps("pulling", "Pulling", "img", 0, 1, 2))
    sink.send(event(10))
    sink.close()
    out, err = capfd.readouterr()  # the process's own stdout/stderr, at the descriptor level
    assert (out, err) == ("", "")
    assert set(os.listdir("/proc/self/fd")) == fds_before  # no descriptor opened (or left open) to write to


def test_rich_display_shows_task_and_layers() -> None:
    out = io.StringIO()
    p = RichProgress(console=Console(file=out, force_terminal=True, width=120))
    p.send(event(5))
    p.send(event(10))
    p.send(ProgressSteps("pulling", "Pulling", "other", 0, 1, 2))
    p.close()
    text = out.getvalue()
    assert "Pulling img" in text and "Layer sha256:aa" in text and "Pulling other" in text
