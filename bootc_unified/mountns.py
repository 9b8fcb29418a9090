"""A private mount namespace for this process, so that its temporary mounts die with it.

The verbs mount EROFS images and overlays under /run/bootc-unified while they work and unmount
them when done; a verb killed in between (SIGKILL, OOM, a power cut of the session) would leave
them, and their loop devices, on the host for good. The command line therefore runs each verb in
a mount namespace of its own: `/` is made a recursive slave (mounts made outside still propagate
in; none made inside propagate out), and when the process exits the kernel drops the namespace
with every mount in it. Commands whose point is a mount the caller keeps (`cfs mount`) opt out.

Only a whole process should enter one: a namespace is per thread, and a library caller (a test
runner, say) may need its mounts seen by other processes.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

from bootc_unified.errors import UserError
from bootc_unified.libc import libc

CLONE_NEWNS = 0x00020000
PID1_NS = Path("/proc/1/ns/mnt")

_origin_fd: int | None = None  # the namespace this process started in, once it has left it


def enter_private(what: str = "this process") -> None:
    """unshare(CLONE_NEWNS) and make `/` rslave; UserError naming `what` on failure."""
    global _origin_fd
    origin = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    if libc().unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        os.close(origin)
        raise UserError(f"{what}: cannot enter a private mount namespace ({os.strerror(err)})")
    proc = subprocess.run(["mount", "--make-rslave", "/"], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"{what}: cannot make / a slave mount in a private namespace ({last})")
    if _origin_fd is None:
        _origin_fd = origin
    else:
        os.close(origin)  # a second one (nested): the first holds where this process started


def entered() -> bool:
    """Whether this process runs in a private mount namespace of its own making."""
    return _origin_fd is not None


def ensure_private(what: str = "this process") -> None:
    """Enter a private mount namespace once per process (root only; a no-op otherwise)."""
    if not entered() and os.geteuid() == 0:
        enter_private(what)


def outer_namespace() -> Path | None:
    """The mount namespace whose mounts the rest of the system sees, as a path `nsenter --mount=`
    takes; None when this process is in it. PID 1's where it can be read (a booted system);
    otherwise (a container or sandbox hides PID 1) the one this process started in."""
    own = os.stat("/proc/self/ns/mnt").st_ino
    try:
        return None if os.stat(PID1_NS).st_ino == own else PID1_NS
    except OSError:
        pass
    if _origin_fd is None or os.fstat(_origin_fd).st_ino == own:
        return None
    return Path(f"/proc/{os.getpid()}/fd/{_origin_fd}")
