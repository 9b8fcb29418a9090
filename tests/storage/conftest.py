"""The crash and concurrency tests' summary at the end of the run: their tables (saved by each test,
on any xdist worker, under artifacts/crash/) summed up in the terminal."""

from __future__ import annotations

import json
import time

import pytest

from testsupport.crashcheck import ARTIFACTS

_started = time.time()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ARTIFACTS.is_dir():
        return
    docs = []
    for path in sorted(ARTIFACTS.glob("*.json")):
        if path.stat().st_mtime >= _started:
            docs.append(json.loads(path.read_text()))
    rows = [row for doc in docs if doc.get("kind") != "rounds" for row in doc.get("rows", [])]
    rounds = [row for doc in docs if doc.get("kind") == "rounds" for row in doc.get("rows", [])]
    if not rows and not rounds:
        return
    tr = terminalreporter
    tr.section("crash injection (artifacts/crash/)")
    tr.write_line(f"{'fs':<6} {'verb':<12} {'point':<32} {'n':>3}  outcome")
    for r in rows:
        tr.write_line(f"{r['fs']:<6} {r['verb']:<12} {r['point']:<32} {r['count']:>3}  {r['outcome']}")
    killed = sum(r["count"] for r in rows if r["outcome"] != "finished first")
    by_verb: dict[str, int] = {}
    for r in rows:
        if r["outcome"] != "finished first":
            by_verb[r["verb"]] = by_verb.get(r["verb"], 0) + r["count"]
    tr.write_line(f"total: {killed} crashes ({', '.join(f'{v} {n}' for v, n in sorted(by_verb.items()))})")
    for r in rounds:
        tr.write_line(f"{r['fs']:<6} {r['verb']} with {r['point']}: {r['count']} rounds, {r['outcome']}")
    if rounds:
        tr.write_line(f"total: {sum(r['count'] for r in rounds)} concurrency rounds")
