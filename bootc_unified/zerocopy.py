"""Sharing file data without copying it: FICLONE reflinks, with a cached per-device-pair probe; an
open file reached again through another mount of its filesystem (for hardlinks across bind mounts)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import threading

from bootc_unified.libc import libc

FICLONE = 0x40049409

# errnos meaning "this pair of filesystems cannot share extents"; anything else is a real error.
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}


class ReflinkProbe:
    """Remembers, per (src_dev, dst_dev), that reflinking is impossible, so it is tried once.

    Device numbers are reused once a filesystem is unmounted, so a probe must not outlive the
    mounts it has seen: each repository keeps its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._unsupported: set[tuple[int, int]] = set()

    def known_unsupported(self, src_dev: int, dst_dev: int) -> bool:
        with self._lock:
            return (src_dev, dst_dev) in self._unsupported

    def mark_unsupported(self, src_dev: int, dst_dev: int) -> None:
        with self._lock:
            self._unsupported.add((src_dev, dst_dev))


def reflink(src_fd: int, dst_fd: int, probe: ReflinkProbe, devices: tuple[int, int] | None = None) -> bool:
    """Make dst (an empty file open for writing) share all of src's extents.

    Returns False when the two filesystems cannot reflink (the answer is cached for the device
    pair, `devices` = (src_dev, dst_dev) when the caller knows them); raises OSError otherwise.
    """
    src_dev, dst_dev = devices or (os.fstat(src_fd).st_dev, os.fstat(dst_fd).st_dev)
    if probe.known_unsupported(src_dev, dst_dev):
        return False
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as e:
        if e.errno in _NO_REFLINK:
            probe.mark_unsupported(src_dev, dst_dev)
            return False
        raise
    return True


def copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy `size` bytes: copy_file_range where the kernel allows it, else read/write."""
    offset = 0
    use_cfr = True
    while offset < size:
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, size - offset, offset, offset)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                use_cfr = False
                continue
        else:
            chunk = os.pread(src_fd, min(1 << 20, size - offset), offset)
            n = os.pwrite(dst_fd, chunk, offset) if chunk else 0
        if n == 0:
            raise OSError(errno.EIO, f"source shrank while copying (at {offset} of {size} bytes)")
        offset += n


# --- the same inode through another mount ------------------------------------------------------

AT_EMPTY_PATH = 0x1000
MAX_HANDLE_SZ = 128


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
    ]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def reopen_through(fd: int, mount_fd: int) -> int:
    """A new read-only fd on the inode behind `fd`, reached through the mount that `mount_fd` is on.

    linkat(2) refuses to link across two mounts even of one filesystem (EXDEV), which is what a
    bind mount is: containers-storage bind-mounts its `overlay/` onto itself unless
    `overlay.skip_mount_home` is set. The file handle (name_to_handle_at) names the inode on the
    filesystem, and open_by_handle_at (CAP_DAC_READ_SEARCH) opens it under `mount_fd`'s mount. Both
    fds must be on the same filesystem.
    """
    handle = _FileHandle()
    handle.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    _check(
        libc().name_to_handle_at(fd, b"", ctypes.byref(handle), ctypes.byref(mount_id), AT_EMPTY_PATH),
        "name_to_handle_at",
    )
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    return _check(libc().open_by_handle_at(mount_fd, ctypes.byref(handle), flags), "open_by_handle_at")
