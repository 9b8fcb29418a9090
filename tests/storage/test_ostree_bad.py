"""The ostree import on bad input (one line naming the culprit, nothing committed, no object
written) and killed part-way (SIGKILL at named points: `ostree fsck` accepts what is left, and the
import run again completes to the same commit)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bootc_unified.cstorage import Store
from bootc_unified.faults import ENV
from bootc_unified.imgstore import ImageStore
from bootc_unified.ostree.repo import OstreeRepo
from harness.loopfs import LoopFs
from harness.testimages import TestImages
from testsupport.plugin import run_cli

pytestmark = pytest.mark.storage


def _objects(repo: OstreeRepo) -> list[Path]:
    return sorted(p for p in repo.objects.rglob("*") if not p.is_dir())


def test_damaged_layer_is_refused_with_nothing_written(
    loopfs: LoopFs, bootc_store: ImageStore, test_images: TestImages
) -> None:
    ref = test_images["features"].ref
    bootc_store.pull(ref, tls_verify=False)
    image = Store.open(bootc_store.root).image(ref)
    victim = image.layers[0].diff_path / "sizes" / "4096"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF  # same size, other bytes: only the DiffID check can notice
    victim.write_bytes(bytes(data))
    repo = OstreeRepo.init(loopfs.path / "repo")
    before = _objects(repo)
    proc = run_cli(
        "internals", "ostree", "--repo", repo.path, "import", "--storage", bootc_store.root, ref, check=False
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and image.layers[0].diff_id in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert repo.refs() == []
    assert _objects(repo) == before  # no content object, no commit
    repo.fsck()


def test_not_an_ostree_repository(loopfs: LoopFs, bootc_store: ImageStore) -> None:
    proc = run_cli(
        "internals",
        "ostree",
        "--repo",
        loopfs.path,
        "import",
        "--storage",
        bootc_store.root,
        "x",
        check=False,
    )
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert str(loopfs.path) in proc.stderr and "not an ostree repository" in proc.stderr


@pytest.mark.parametrize(
    "point",
    [
        "ostree-import-object:3",
        "ostree-object-before-link:2",
        "ostree-import-before-commit",
        "ostree-import-before-ref",
    ],
)
def test_crash_mid_import_leaves_a_sound_repository(
    loopfs: LoopFs, bootc_store: ImageStore, test_images: TestImages, point: str
) -> None:
    ref = test_images["features"].ref
    bootc_store.pull(ref, tls_verify=False)
    repo = OstreeRepo.init(loopfs.path / "repo")
    cmd = [sys.executable, "-m", "bootc_unified", "internals", "ostree", "--repo", str(repo.path)]
    cmd += ["import", "--storage", str(bootc_store.root), ref]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, ENV: point})
    assert proc.returncode == -9, (proc.returncode, proc.stderr)  # killed at the point, not finished
    assert repo.refs() == []
    repo.fsck()
    result = json.loads(run_cli(*cmd[3:]).stdout)
    assert repo.resolve(str(result["ref"])) == result["commit"]
    assert not list(repo.tmp.glob("bootc-unified-import-*"))  # the dead import's tree is gone
    repo.fsck()
