"""Sharing file data without copying it: FICLONE reflinks, with a cached per-device-pair probe."""

from __future__ import annotations

import errno
import fcntl
import os
import threading

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
