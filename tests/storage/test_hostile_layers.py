"""Hostile layers through the whole path (issue 12, R3): crafted layer tars in an OCI layout, copied into
a private containers-storage by skopeo (containers/storage unpacks them, as a pull does), imported.

podman's behaviour is the reference for what a container sees. Each case ends one of three ways:
containers/storage refuses it at pull (it can never reach the import); we refuse it with one line
naming the layer and the entry, and publish nothing; or we import it exactly as podman shows it
(kernel mount of our EROFS image == podman's mount, every layer stream hashing to its DiffID).
test_import_bad.py covers `../x`, `a/../../b`, `/abs`, a symlink loop, a same-layer path through a
symlink, a 64 KiB xattr value, hardlinks to missing or later entries and a duplicate regular file.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from harness.loopfs import LoopFs
from harness.run import CommandError
from testsupport.cstore_fixtures import (
    BuiltImage,
    StoreDirs,
    copy_into_store,
    make_store_dirs,
    release_store,
    write_oci_layout,
)
from testsupport.hostile import (
    BASE,
    Case,
    assert_as_podman,
    assert_refused,
    directory,
    hardlink,
    import_cli,
    init_repo,
    symlink,
    tar,
)
from testsupport.plugin import LoopFsFactory
from testsupport.tarlayer import entry

pytestmark = pytest.mark.storage

X = b"x" * 100
LONG = "n" * 255
DEEP = "/".join(["p" * 250] * 17)  # 4,266 bytes: over PATH_MAX (4096)


def sparse_tar(fmt: str) -> bytes:
    """A layer holding one 8 MiB file with data at 0 and 4 MiB and holes elsewhere, written by GNU tar
    with --sparse (`gnu`: old GNU sparse headers; `posix`: PAX GNU.sparse 1.0)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "sparse")
        with open(src, "wb") as f:
            f.write(b"head" * 1000)
            f.seek(4 << 20)
            f.write(b"middle" * 1000)
            f.truncate(8 << 20)
        os.utime(src, (1_700_000_000, 1_700_000_000))
        argv = [
            "tar",
            "--sparse",
            f"--format={fmt}",
            "--owner=0",
            "--group=0",
            "-C",
            tmp,
            "-cf",
            "-",
            "sparse",
        ]
        return subprocess.run(argv, check=True, capture_output=True).stdout


def many_entries(count: int) -> bytes:
    """One directory with `count` empty files (ustar headers only: 512 bytes each)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("many")
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
        tf.addfile(info)
        for i in range(count):
            info = tarfile.TarInfo(f"many/{i:06}")
            info.mtime = 1_700_000_000
            tf.addfile(info)
    return buf.getvalue()


CASES: dict[str, Case] = {
    # --- path traversal ------------------------------------------------------------------------
    # containers/storage resolves a hardlink's target inside the layer; an absolute target is the
    # layer's own `/target`.
    "hardlink-absolute": Case((tar(entry("t2", b"y" * 100), hardlink("hl", "/t2")),), "as-podman"),
    "hardlink-dotdot": Case(
        (tar(entry("t2", b"y" * 100), hardlink("hl", "../t2")),), "refused", ("layer sha256:", "'hl'", "..")
    ),
    # a symlink's target is data, never followed at import: kept verbatim as podman keeps it
    "symlink-target-escapes": Case((tar(symlink("esc", "../../../../etc/shadow")),), "as-podman"),
    # cleaned lexically as containers/storage cleans it: `etc/../inside` is /inside
    "dotdot-in-middle-stays-inside": Case((tar(entry("etc/../inside", X)),), "as-podman"),
    # --- symlinked parent components -----------------------------------------------------------
    # A later layer replaces the directory d by a symlink, a third one puts entries under d:
    # overlayfs shows the third layer's d (a directory podman made implicitly) over the symlink.
    "symlink-parent-later-layer": Case(
        (tar(entry(".wh.d", b""), symlink("d", "/etc")), tar(entry("d/x", X))),
        "as-podman",
        podman_mtime=("d",),
    ),
    "symlink-parent-explicit-dir": Case(
        (tar(entry(".wh.d", b""), symlink("d", "/etc")), tar(directory("d"), entry("d/x", X))),
        "as-podman",
    ),
    "whiteout-under-symlink": Case(
        (tar(entry(".wh.d", b""), symlink("d", "/etc")), tar(entry("d/.wh.os-release", b""))),
        "as-podman",
        podman_mtime=("d",),
        podman_ghosts=("d/os-release",),
    ),
    # --- hardlinks -----------------------------------------------------------------------------
    "hardlink-to-lower-layer": Case((tar(hardlink("hl", "etc/os-release")),), "pull-refused"),
    "hardlink-to-directory": Case((tar(directory("dd"), hardlink("hl", "dd")),), "pull-refused"),
    "hardlink-to-symlink": Case((tar(symlink("s", "target"), hardlink("hl", "s")),), "as-podman"),
    "hardlink-chain": Case(
        (tar(entry("a", b"a" * 100), hardlink("b", "a"), hardlink("c", "b")),), "as-podman"
    ),
    # --- duplicate entries ---------------------------------------------------------------------
    "duplicate-file-then-dir": Case((tar(entry("fd", X), directory("fd")),), "pull-refused"),
    "duplicate-dir-twice": Case((tar(directory("dd", 0o700), directory("dd", 0o755)),), "pull-refused"),
    # --- long names and paths ------------------------------------------------------------------
    "name-255-bytes": Case((tar(directory(LONG), entry(f"{LONG}/{LONG}", X)),), "as-podman"),
    "name-256-bytes": Case((tar(entry("m" * 256, X)),), "pull-refused"),
    "path-over-4096-bytes": Case((tar(entry(DEEP, X)),), "pull-refused"),
    # --- xattrs --------------------------------------------------------------------------------
    # EROFS's e_value_size is a u16: 65535 is the largest value it holds (65536 is in test_import_bad);
    # ext4 keeps at most one block of xattrs per inode, so containers/storage fails there at pull
    "xattr-value-65535": Case(
        (tar(entry("big", X, pax_headers={"SCHILY.xattr.user.big": "v" * 65535})),),
        "as-podman",
        pull_refused_on=("ext4", "btrfs"),  # btrfs: one xattr item must fit a 16 KiB tree node
    ),
    "xattrs-many": Case(
        (tar(entry("many", X, pax_headers={f"SCHILY.xattr.user.x{i:03}": f"{i}" * 40 for i in range(60)})),),
        "as-podman",
        pull_refused_on=("ext4",),
    ),
    # more than an EROFS inode's xattr area holds (i_xattr_icount is a u16: 262,152 bytes)
    "xattrs-over-erofs-inode-limit": Case(
        (tar(entry("huge", X, pax_headers={f"SCHILY.xattr.user.h{i}": "h" * 60000 for i in range(5)})),),
        "refused",
        ("/huge", "xattr", "layers sha256:"),
        pull_refused_on=("ext4", "btrfs"),
    ),
    # --- special files and mode bits -----------------------------------------------------------
    "devices-and-fifo": Case(
        (
            tar(
                entry("null", b"", type=tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
                entry("loop0", b"", type=tarfile.BLKTYPE, mode=0o660, devmajor=7, devminor=0),
                entry("fifo", b"", type=tarfile.FIFOTYPE, mode=0o600),
            ),
        ),
        "as-podman",
    ),
    # the largest numbers Linux's dev_t (and EROFS's 32-bit new_encode_dev) hold
    # (XFS stores only 14-bit majors and 18-bit minors: mknod fails there at pull)
    "device-numbers-at-limit": Case(
        (tar(entry("big-dev", b"", type=tarfile.CHRTYPE, mode=0o600, devmajor=4095, devminor=1048575)),),
        "as-podman",
        pull_refused_on=("xfs",),
    ),
    # containers/storage accepts it and the kernel's mknod truncates it to another device: refused
    "device-number-over-limit": Case(
        (tar(entry("huge-dev", b"", type=tarfile.CHRTYPE, mode=0o600, devmajor=4096, devminor=1)),),
        "refused",
        ("/huge-dev", "device number", "layers sha256:"),
    ),
    "setuid-setgid-sticky": Case(
        (
            tar(
                entry("suid", b"#!/bin/sh\n" * 10, mode=0o4755),
                entry("sgid", b"s", mode=0o2711),
                entry("all", b"a" * 70, mode=0o7777),
                directory("tmp", 0o1777),
                directory("shared", 0o2775, gid=100),
            ),
        ),
        "as-podman",
    ),
    "zeros-64mib": Case((tar(entry("zeros", bytes(64 << 20))),), "as-podman"),
    # GNU sparse entries: containers/storage writes the expanded file into diff/, tar-split keeps the
    # archive's bytes; the container sees the 8 MiB file
    "sparse-gnu": Case((sparse_tar("gnu"),), "pull-refused"),  # "unhandled tar header type 83"
    # PAX GNU.sparse 1.0: containers/storage expands the file, and its tar-split records the expanded
    # content, not the archive's sparse map and data: the layer tar cannot be rebuilt (podman's own
    # push of it would not match its DiffID either). Refused, naming the layer and the DiffID check.
    "sparse-pax-1.0": Case((sparse_tar("posix"),), "refused", ("layer sha256:", "expected the DiffID")),
    # --- one directory with 100,000 entries: the EROFS directory blocks must hold every name ------
    "100000-entries-in-one-dir": Case((many_entries(100_000),), "as-podman", fs_size=4 << 30),
    # --- whiteouts -----------------------------------------------------------------------------
    "whiteout-of-missing-path": Case((tar(entry(".wh.nothere", b"")),), "as-podman"),
    "whiteout-in-missing-dir": Case(
        (tar(entry("nodir/.wh.nothere", b"")),),
        "as-podman",
        podman_mtime=("nodir",),
        podman_ghosts=("nodir/nothere",),
    ),
    "opaque-dir-in-lowest-layer": Case(
        (tar(directory("o"), entry("o/.wh..wh..opq", b""), entry("o/kept", X)),), "as-podman"
    ),
    "whiteout-after-entry-same-layer": Case((tar(entry("late", X), entry(".wh.late", b"")),), "pull-refused"),
}


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hostile-layers") / "layout"
    write_oci_layout(path, [BuiltImage(name, (BASE, *case.layers)) for name, case in CASES.items()])
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_layer(
    layout: Path, loopfs_factory: LoopFsFactory, fs_kind: str, name: str, tmp_path: Path
) -> None:
    case = CASES[name]
    loopfs = loopfs_factory(fs_kind, size=case.fs_size)
    store = make_store_dirs(loopfs.path / "store")
    try:
        check_case(case, name, layout, loopfs, store, fs_kind, tmp_path)
    finally:
        release_store(store)


def check_case(
    case: Case, name: str, layout: Path, loopfs: LoopFs, store: StoreDirs, fs_kind: str, tmp_path: Path
) -> None:
    ref = f"localhost/{name}:latest"
    repo = init_repo(loopfs.path / "composefs")
    if case.outcome == "pull-refused" or fs_kind in case.pull_refused_on:
        with pytest.raises(CommandError):
            copy_into_store(layout, name, store, ref)
        return
    copy_into_store(layout, name, store, ref)
    if case.outcome == "refused":
        proc = import_cli(repo, store.root, ref)
        assert_refused(proc, repo, *case.names)
        return
    diff_ids = BuiltImage(name, (BASE, *case.layers)).diff_ids
    assert_as_podman(store, repo, ref, diff_ids, tmp_path / "mnt", case.podman_mtime, case.podman_ghosts)
