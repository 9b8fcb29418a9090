"""The pull's `podman system service` dies with the verb that started it (real processes, real
SIGKILL): through PR_SET_PDEATHSIG, and also when the verb died before the prctl took effect."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from bootc_unified.pullprogress import _die_with

# A "verb": starts a long child the way Service does, prints the child's PID, then waits to be killed.
VERB = """
import os, subprocess, sys, time
from bootc_unified.pullprogress import _die_with
child = subprocess.Popen(["sleep", "300"], start_new_session=True, preexec_fn=_die_with(os.getpid()))
print(child.pid, flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_the_service_dies_when_the_verb_is_killed() -> None:
    verb = subprocess.Popen([sys.executable, "-c", VERB], stdout=subprocess.PIPE, text=True)
    assert verb.stdout is not None
    child = int(verb.stdout.readline())
    assert _alive(child)
    os.kill(verb.pid, signal.SIGKILL)
    verb.wait()
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the child outlived its killed parent"


def test_a_child_whose_parent_already_died_exits_at_once() -> None:
    """As if the verb died between fork and the prctl: the PID the child was given is no longer its parent."""
    proc = subprocess.Popen(["sleep", "300"], preexec_fn=_die_with(os.getpid() + 1_000_000))
    try:
        assert proc.wait(timeout=10) == 1
    finally:
        proc.kill()
    ok = subprocess.Popen(["true"], preexec_fn=_die_with(os.getpid()))
    assert ok.wait(timeout=10) == 0
