"""The security basics of a sysroot, checked from `lstat` alone: the repository, the store and the
state dir are root's (0700), and nothing world-writable can be reached by another user.

A world-writable entry is fine only below a directory others cannot search (a 0700 one): the
images' own /tmp and /var/tmp (mode 1777) live in the store's layers, the repository's objects and
the deployments' /var seed, and are reached only through the mounts the boot makes of them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE = ("composefs", "ostree/bootc/storage", "state")


def problems(root: Path) -> list[str]:
    """What breaks the rules under the sysroot `root`, a line each (empty: nothing)."""
    out = []
    for rel in PRIVATE:
        st = os.lstat(root / rel)
        if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o777 != 0o700 or st.st_uid != 0:
            out.append(f"{rel}: mode {st.st_mode & 0o7777:o} uid {st.st_uid}, want 0700 and root")

    def walk(path: Path, reachable: bool) -> None:
        for entry in os.scandir(path):
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                continue
            if reachable and st.st_mode & 0o002:
                out.append(f"{Path(entry.path).relative_to(root)}: world-writable and reachable by others")
            if entry.is_dir(follow_symlinks=False):
                walk(Path(entry.path), reachable and bool(st.st_mode & 0o001))

    walk(root, bool(os.stat(root).st_mode & 0o001))
    return out
