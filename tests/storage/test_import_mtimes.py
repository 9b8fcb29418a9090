"""Nanosecond mtimes through podman and through our import.

The test images are built with a fixed `--timestamp` and buildah truncates layer mtimes to whole
seconds, so nothing else gives a fraction of a second. Here a hand-written layer (PAX records
`mtime=S.NNNNNNNNN` on a directory, files, a hardlink and a symlink; one file with whole seconds
only) is `podman import`ed into the bootc store; podman's view must carry the fractions (so the
comparison is not vacuous), and our mounted EROFS image must equal it, mtimes included.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from bootc_unified.imgstore import ImageStore
from bootc_unified.repository import Repository
from harness.loopfs import LoopFs
from harness.treecompare import differences, snapshot_dir
from testsupport.plugin import run_cli

pytestmark = pytest.mark.storage

REF = "localhost/bootc-unified-test/mtimes:1"
# path -> PAX mtime (None: the ustar header's whole seconds only)
TIMES = {
    "d": "1500000000.25",
    "d/nano": "1234567890.123456789",
    "d/half": "1600000000.5",
    "d/whole": None,
    "d/link": "1400000000.000000042",
    "d/hard": None,  # a hardlink: podman sets the shared inode's times from this header too
}


def layer_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, pax in TIMES.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_300_000_000
            if pax is not None:
                info.pax_headers = {"mtime": pax}
            data = None
            if name == "d":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif name == "d/link":
                info.type, info.linkname = tarfile.SYMTYPE, "nano"
            elif name == "d/hard":
                info.type, info.linkname = tarfile.LNKTYPE, "d/nano"
                # the same times as the target's header, so the order of Chtimes calls is moot
                info.pax_headers = {"mtime": TIMES["d/nano"] or ""}
            else:
                body = name.encode() * 20  # over 64 bytes: an object, not inline
                info.size, data = len(body), io.BytesIO(body)
            tar.addfile(info, data)
    return buf.getvalue()


def test_nanosecond_mtimes_equal_podman_view(loopfs: LoopFs, bootc_store: ImageStore, tmp_path: Path) -> None:
    tar = tmp_path / "layer.tar"
    tar.write_bytes(layer_tar())
    bootc_store.podman(["import", str(tar), REF])
    mountpoint = Path(bootc_store.podman(["image", "mount", REF]).stdout.strip())
    try:
        theirs = snapshot_dir(mountpoint)
    finally:
        bootc_store.podman(["image", "unmount", REF])
    got = {p: (r.mtime, r.mtime_nsec) for p, r in theirs.records.items()}
    assert got[b"/d"] == (1_500_000_000, 250_000_000)
    assert got[b"/d/nano"] == got[b"/d/hard"] == (1_234_567_890, 123_456_789)
    assert got[b"/d/half"] == (1_600_000_000, 500_000_000)
    assert got[b"/d/whole"] == (1_300_000_000, 0)
    assert got[b"/d/link"] == (1_400_000_000, 42)

    repo = Repository.init(loopfs.path / "composefs", insecure=True)
    out = json.loads(
        run_cli("internals", "cfs", "--repo", repo.path, "import", "--storage", bootc_store.root, REF).stdout
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_cli("internals", "cfs", "--repo", repo.path, "mount", out["image_id"], mnt)
    try:
        ours = snapshot_dir(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    ours.records[b"/"] = theirs.records[b"/"]  # the root's metadata is podman's own choice
    assert differences(theirs, ours) == []
