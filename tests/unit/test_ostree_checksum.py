"""ostree content checksums from the hand-written GVariant file header, against `ostree checksum`
(the oracle) on files with xattrs, symlinks, setuid, odd modes and owners other than root."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bootc_unified.ostree.gvariant import file_header, regular_checksum_fd, symlink_checksum
from harness.pytest_plugin import require


def _oracle(path: Path) -> str:
    return subprocess.run(
        ["ostree", "checksum", path], check=True, capture_output=True, text=True
    ).stdout.strip()


def _xattrs(path: Path, follow: bool = True) -> dict[bytes, bytes]:
    """The file's xattrs as ostree reads them from disk: empty values skipped (libglnx does)."""
    pairs = (
        (n, os.getxattr(path, n, follow_symlinks=follow)) for n in os.listxattr(path, follow_symlinks=follow)
    )
    return {os.fsencode(n): v for n, v in pairs if v}


def _ours(path: Path) -> str:
    st = os.lstat(path)
    if os.path.islink(path):
        return symlink_checksum(st.st_uid, st.st_gid, os.readlink(os.fsencode(path)), _xattrs(path, False))
    fd = os.open(path, os.O_RDONLY)
    try:
        return regular_checksum_fd(fd, st.st_uid, st.st_gid, st.st_mode, _xattrs(path))
    finally:
        os.close(fd)


@pytest.fixture
def workdir() -> Path:
    require([] if shutil.which("ostree") else ["ostree not found"], "ostree checksum (the oracle)")
    if os.geteuid() != 0:
        pytest.skip("chown to other owners needs root")  # unit tier may run unprivileged
    # /var/tmp: a disk filesystem with user.* and security.* xattrs (tmpfs lacks user.* before 6.6)
    d = Path(f"/var/tmp/bootc-unified-ostree-checksum-{os.getpid()}")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    yield d  # type: ignore[misc]
    shutil.rmtree(d, ignore_errors=True)


CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")


@pytest.mark.parametrize(
    ("content", "mode", "uid", "gid", "xattrs"),
    [
        (b"", 0o644, 0, 0, {}),
        (b"hello\n", 0o4755, 0, 0, {}),  # setuid
        (b"x" * 70000, 0o2751, 1000, 100, {"user.a": b"1"}),  # setgid, header offsets of 2 bytes
        (b"data", 0o1000, 4294967294, 65534, {}),  # sticky only, big ids
        (b"cap", 0o755, 0, 0, {"security.capability": CAPABILITY, "user.zz": b"last", "user.aa": b""}),
        (b"long", 0o600, 5, 6, {"user." + "n" * 200: b"v" * 300}),  # offsets grow past one byte
    ],
)
def test_regular_file_checksum_equals_ostree(
    workdir: Path, content: bytes, mode: int, uid: int, gid: int, xattrs: dict[str, bytes]
) -> None:
    path = workdir / "f"
    path.write_bytes(content)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    for name, value in xattrs.items():
        os.setxattr(path, name, value)
    assert _ours(path) == _oracle(path)


@pytest.mark.parametrize("target", [b"../x", b"/abs/path", b"t" * 300, "caf\u00e9".encode()])
def test_symlink_checksum_equals_ostree(workdir: Path, target: bytes) -> None:
    path = workdir / "l"
    os.symlink(target, path)
    os.chown(path, 7, 8, follow_symlinks=False)
    assert _ours(path) == _oracle(path)


def test_header_layout() -> None:
    """(uuuusa(ayay)) of a plain file: four BE u32, "" + NUL, no xattrs, one 1-byte offset (17)."""
    assert (
        file_header(0, 0, 0o100644, b"", {})
        == bytes(4) * 2 + (0o100644).to_bytes(4, "big") + bytes(4) + b"\0" + b"\x11"
    )
    with pytest.raises(ValueError):
        file_header(0, 0, 0o120777, b"a\0b", {})
