"""`image pull --progress-fd`: bootc's JSON-lines protocol from a real pull, checked against the
registry's manifests (layer digests and sizes) as the oracle."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bootc_unified.imgstore import ImageStore
from bootc_unified.progress import JsonLinesProgress
from harness.testimages import REPOSITORY, TestImages, fetch_manifest

pytestmark = pytest.mark.storage

BYTES_FIELDS = {
    "type", "task", "description", "id", "bytesCached", "bytes", "bytesTotal",
    "stepsCached", "steps", "stepsTotal", "subtasks",
}  # fmt: skip
SUBTASK_BYTES_FIELDS = {"subtask", "description", "id", "bytesCached", "bytes", "bytesTotal"}
STEPS_FIELDS = {"type", "task", "description", "id", "stepsCached", "steps", "stepsTotal", "subtasks"}


def pull_with_progress_fd(
    sysroot: Path, ref: str, *extra: str
) -> tuple[subprocess.CompletedProcess[str], list[Any]]:
    r, w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bootc_unified", "image", "pull", "--sysroot", str(sysroot),
             "--tls-verify", "false", "--progress-fd", str(w), *extra, ref],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, pass_fds=(w,),
        )  # fmt: skip
        os.close(w)
        w = -1
        with os.fdopen(r, "r") as f:
            r = -1
            text = f.read()
        out, err = proc.communicate(timeout=120)
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
    assert text.endswith("\n") or not text
    events = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), events


def manifest_layers(test_images: TestImages, name: str, compression: str) -> list[dict[str, Any]]:
    m = fetch_manifest(test_images.registry_address, f"{REPOSITORY}/{name}-{compression}", "latest")
    layers = m["layers"]
    assert isinstance(layers, list)
    return layers


def check_protocol(events: list[Any]) -> list[Any]:
    """Start first; shapes as bootc's; nothing exceeds its total; progress never goes backwards."""
    assert events[0] == {"type": "Start", "version": "0.1.0"}
    assert all(e["type"] != "Start" for e in events[1:])
    progress = [e for e in events[1:] if e["type"] == "ProgressBytes"]
    last = (0, 0)
    for e in progress:
        assert set(e) == BYTES_FIELDS
        assert 0 <= e["bytesCached"] <= e["bytes"] <= e["bytesTotal"]
        assert 0 <= e["stepsCached"] <= e["steps"] <= e["stepsTotal"]
        assert e["bytes"] == sum(s["bytes"] for s in e["subtasks"])
        assert e["bytesTotal"] == sum(s["bytesTotal"] for s in e["subtasks"])
        for s in e["subtasks"]:
            assert set(s) == SUBTASK_BYTES_FIELDS
            assert 0 <= s["bytesCached"] <= s["bytes"] <= s["bytesTotal"]
        assert (e["bytes"], e["steps"]) >= last
        last = (e["bytes"], e["steps"])
    for e in events[1:]:
        if e["type"] == "ProgressSteps":
            assert set(e) == STEPS_FIELDS
            assert 0 <= e["stepsCached"] <= e["steps"] <= e["stepsTotal"]
    return progress


def test_progress_fd_bytes_match_the_registry(sysroot: Path, test_images: TestImages) -> None:
    layers = manifest_layers(test_images, "features", "zstd")
    proc, events = pull_with_progress_fd(sysroot, test_images["features"].refs["zstd"])
    assert proc.returncode == 0, proc.stderr
    progress = check_protocol(events)
    assert len(progress) >= 2  # the announcement and the final state
    final = progress[-1]
    assert final["id"] == test_images["features"].refs["zstd"]
    assert [s["id"] for s in final["subtasks"]] == [x["digest"] for x in layers]
    assert [s["bytesTotal"] for s in final["subtasks"]] == [x["size"] for x in layers]
    assert final["bytes"] == final["bytesTotal"] == sum(x["size"] for x in layers)
    assert final["steps"] == final["stepsTotal"] == len(layers)
    assert final["bytesCached"] == 0 and final["stepsCached"] == 0
    assert progress[0]["bytes"] == 0  # announced before any layer was fetched


@pytest.mark.fs("xfs")
def test_progress_fd_reports_cached_layers(sysroot: Path, test_images: TestImages) -> None:
    """small-b's first layer is small-a's: after small-a, it is reported as cached."""
    assert pull_with_progress_fd(sysroot, test_images["small-a"].ref)[0].returncode == 0
    layers = manifest_layers(test_images, "small-b", "gzip")
    proc, events = pull_with_progress_fd(sysroot, test_images["small-b"].ref)
    assert proc.returncode == 0, proc.stderr
    final = check_protocol(events)[-1]
    assert final["stepsCached"] == 1 and final["steps"] == final["stepsTotal"] == 2
    assert final["bytesCached"] == layers[0]["size"]
    assert final["subtasks"][0]["bytesCached"] == layers[0]["size"]
    assert final["subtasks"][1]["bytesCached"] == 0

    # Already present with --policy missing: one completed, cached step and nothing fetched.
    proc, events = pull_with_progress_fd(sysroot, test_images["small-b"].ref)
    assert proc.returncode == 0, proc.stderr
    check_protocol(events)
    assert [e["type"] for e in events] == ["Start", "ProgressSteps"]
    assert events[1]["steps"] == events[1]["stepsTotal"] == events[1]["stepsCached"] == 1


@pytest.mark.fs("ext4")
def test_progress_fd_on_failure_is_still_valid(sysroot: Path, test_images: TestImages) -> None:
    proc, events = pull_with_progress_fd(sysroot, f"{test_images.registry_address}/no/such:1")
    assert proc.returncode == 1
    assert "no/such:1" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert events == [{"type": "Start", "version": "0.1.0"}]


@pytest.mark.fs("btrfs")
def test_plain_pull_reports_layer_steps(sysroot: Path, test_images: TestImages) -> None:
    """The fallback without the podman service: one step per blob `podman pull` announces."""
    layers = manifest_layers(test_images, "features", "gzip")
    store = ImageStore.ensure(sysroot)
    buf = io.StringIO()
    sink = JsonLinesProgress(buf)
    image_id = store.pull_plain(test_images["features"].ref, tls_verify=False, progress=sink)
    events = [json.loads(line) for line in buf.getvalue().splitlines()]
    check_protocol(events)
    final = events[-1]
    assert final["type"] == "ProgressSteps"
    assert final["steps"] == final["stepsTotal"] == len(layers)
    assert sorted(s["id"] for s in final["subtasks"]) == sorted(x["digest"] for x in layers)
    assert all(s["completed"] for s in final["subtasks"])
    assert store.inspect(image_id).digest == test_images["features"].digests["gzip"]
