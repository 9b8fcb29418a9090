"""set-unified's pieces that need no loop filesystem: argv -> options, the pull-by-digest reference,
the staging directory's crash recovery (directory times from the journal), file metadata carried
onto an object, and FIDEDUPERANGE on a filesystem that cannot dedupe (tmpfs says EOPNOTSUPP)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from bootc_unified.cli import build_parser
from bootc_unified.cli.image import set_unified_opts
from bootc_unified.dedupe import Meta, Staging, dedupe_range
from bootc_unified.deploy.setunified import SetUnifiedOpts, digest_ref

D = "sha256:" + "ab" * 32


def test_set_unified_opts() -> None:
    args = build_parser().parse_args(
        ["image", "set-unified", "--sysroot", "/x", "--tls-verify", "false", "--progress-fd", "3"]
    )
    assert set_unified_opts(args) == SetUnifiedOpts(
        sysroot=Path("/x"), mountinfo=None, tls_verify=False, authfile=None, progress_fd=3
    )
    defaults = set_unified_opts(build_parser().parse_args(["image", "set-unified"]))
    assert defaults == SetUnifiedOpts()


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("quay.io/a/b:latest", f"quay.io/a/b@{D}"),
        ("quay.io/a/b", f"quay.io/a/b@{D}"),
        ("127.0.0.1:5000/a/b:1", f"127.0.0.1:5000/a/b@{D}"),
        ("127.0.0.1:5000/a/b", f"127.0.0.1:5000/a/b@{D}"),
        (f"quay.io/a/b@sha256:{'cd' * 32}", f"quay.io/a/b@{D}"),
    ],
)
def test_digest_ref(name: str, want: str) -> None:
    assert digest_ref(name, D) == want


def test_staging_recovery_puts_directory_times_back(tmp_path: Path) -> None:
    d = tmp_path / "diff" / "usr"
    d.mkdir(parents=True)
    os.utime(d, ns=(1_000_000_000, 1_700_000_000_000_000_000))
    stage = Staging(tmp_path / "staging")
    times = stage.record({d})
    (tmp_path / "obj").write_bytes(b"x")
    stage.link_over(tmp_path / "obj", d / "f")
    assert os.stat(d).st_mtime_ns != 1_700_000_000_000_000_000  # the rename stamped it
    (stage.path / "leftover").write_bytes(b"")  # a link a crash left before its rename
    assert json.loads(stage.journal.read_text()) == {str(d): list(times[d])}
    Staging(stage.path).recover()  # the next run, after a crash
    assert os.stat(d).st_mtime_ns == 1_700_000_000_000_000_000
    assert not stage.path.exists()
    assert os.stat(d / "f").st_ino == os.stat(tmp_path / "obj").st_ino


def test_torn_journal_is_ignored(tmp_path: Path) -> None:
    stage = Staging(tmp_path / "staging")
    stage.path.mkdir()
    stage.journal.write_text('{"/nowhere": [1,')
    stage.recover()
    assert not stage.path.exists()


def test_meta_apply(tmp_path: Path) -> None:
    src, obj = tmp_path / "src", tmp_path / "obj"
    src.write_bytes(b"a")
    obj.write_bytes(b"a")
    os.chmod(src, 0o4751)
    os.utime(src, ns=(0, 1_600_000_000_123_456_789))
    try:
        os.setxattr(src, "user.k", b"v")
        os.setxattr(obj, "user.other", b"w")
    except OSError as e:
        pytest.skip(f"no user xattrs on {tmp_path}: {e.strerror}")
    want = Meta.of(src, os.lstat(src))
    assert Meta.of(obj, os.lstat(obj)) != want
    want.apply(obj, 0)
    assert Meta.of(obj, os.lstat(obj)) == want


def test_dedupe_unsupported_raises(tmp_path: Path) -> None:
    tmpfs = Path("/dev/shm")
    if not tmpfs.is_dir():
        pytest.skip("no /dev/shm")
    a, b = tmpfs / f"bootc-unified-dedupe-{os.getpid()}-a", tmpfs / f"bootc-unified-dedupe-{os.getpid()}-b"
    try:
        a.write_bytes(b"x" * 8192)
        b.write_bytes(b"x" * 8192)
        fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as err:
                dedupe_range(fa, fb, 8192)
            assert err.value.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY)
        finally:
            os.close(fa)
            os.close(fb)
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)
