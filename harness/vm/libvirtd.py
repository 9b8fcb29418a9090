"""Connect to libvirt's system daemon, starting virtlogd and libvirtd first when they are not
running and PID 1 is not systemd (containers, CI runners): the harness needs no service manager.

The connection URI is qemu:///system unless BOOTC_UNIFIED_LIBVIRT_URI names another (the
qualification's --libvirt-uri); only the default one is started here when it does not answer."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from harness.cache import file_lock
from harness.run import run

URI = "qemu:///system"
URI_ENV = "BOOTC_UNIFIED_LIBVIRT_URI"
START_TIMEOUT = 30.0
QEMU_CONF = Path("/etc/libvirt/qemu.conf")  # ci/services.sh sets user/group = "root" there


class LibvirtUnavailable(RuntimeError):
    pass


def missing_prerequisites() -> list[str]:
    problems = []
    try:
        import libvirt  # noqa: F401
    except ImportError:
        problems.append("libvirt-python (pip install libvirt-python, needs libvirt-dev)")
    for daemon in ("libvirtd", "virtlogd"):
        if shutil.which(daemon) is None:
            problems.append(f"{daemon} not found (Debian package libvirt-daemon-system)")
    return problems


def qemu_runs_as_root(conf: Path = QEMU_CONF) -> bool:
    try:
        return any(line.strip() == 'user = "root"' for line in conf.read_text().splitlines())
    except OSError:
        return False


def pid1_is_systemd() -> bool:
    try:
        return Path("/proc/1/comm").read_text().strip() == "systemd"
    except OSError:
        return False


def uri() -> str:
    return os.environ.get(URI_ENV) or URI


def _try_open() -> Any:
    import libvirt

    try:
        return libvirt.open(uri())
    except libvirt.libvirtError:
        return None


def _running(pidfile: str) -> bool:
    try:
        pid = int(Path(pidfile).read_text().strip())
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        return False


def connect() -> Any:
    """An open connection to uri() (a libvirt.virConnect)."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions
    conn = _try_open()
    if conn is not None:
        return conn
    if uri() != URI:
        raise LibvirtUnavailable(f"cannot connect to {uri()} (from {URI_ENV})")
    if pid1_is_systemd():
        raise LibvirtUnavailable(f"cannot connect to {URI}: start it with `systemctl start libvirtd`")
    with file_lock("libvirtd-start"):
        conn = _try_open()
        if conn is not None:
            return conn
        if not _running("/run/libvirt/virtlogd.pid") and not _running("/run/virtlogd.pid"):
            run(["virtlogd", "-d"])
        if not _running("/run/libvirtd.pid"):
            if not qemu_runs_as_root():
                warnings.warn(
                    f'{QEMU_CONF} does not set user = "root": libvirt may re-probe QEMU on every '
                    "domain start (about a minute each when /dev/kvm is root-only); run ci/services.sh",
                    stacklevel=2,
                )
            run(["libvirtd", "-d"])
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            conn = _try_open()
            if conn is not None:
                return conn
            time.sleep(0.5)
    raise LibvirtUnavailable(f"started libvirtd but {URI} did not answer within {START_TIMEOUT:.0f}s")
