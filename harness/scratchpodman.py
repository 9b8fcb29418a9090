"""Plain podman on a throwaway store: the tests' independent view of images (not bootc_unified code).

Everything is pinned under `workdir`: storage.conf (overlay, graphroot, runroot), an empty
registries.conf and auth file, so neither the host's storage nor its configuration is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from harness.run import run


def unmount_under(path: Path) -> None:
    """Unmount every mount at or below `path`, deepest first."""
    prefix = str(path.resolve())
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    for point in sorted((p for p in points if p == prefix or p.startswith(prefix + "/")), reverse=True):
        run(["umount", point], check=False)


def pinned_env(workdir: Path, graphroot: Path, runroot: Path, extra_storage_conf: str = "") -> dict[str, str]:
    """Write storage.conf (overlay, graphroot, runroot), an empty registries.conf and auth file in
    `workdir`; return an environment that makes podman/buildah/skopeo read those and nothing else."""
    conf = workdir / "storage.conf"
    conf.write_text(
        "[storage]\n"
        'driver = "overlay"\n'
        f"graphroot = {json.dumps(str(graphroot))}\n"
        f"runroot = {json.dumps(str(runroot))}\n"
        "[storage.options.overlay]\n"
        'skip_mount_home = "true"\n' + extra_storage_conf
    )
    registries = workdir / "registries.conf"
    registries.write_text('unqualified-search-registries = []\nshort-name-mode = "enforcing"\n')
    auth = workdir / "auth.json"
    auth.write_text('{"auths": {}}\n')
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CONTAINERS_", "REGISTRY_AUTH"))},
        "CONTAINERS_STORAGE_CONF": str(conf),
        "CONTAINERS_REGISTRIES_CONF": str(registries),
        "REGISTRY_AUTH_FILE": str(auth),
    }


@dataclass
class ScratchPodman:
    """Podman with a configuration written in `workdir`.

    By default it also owns a fresh store (`workdir/root`). Pass `graphroot`/`runroot` to look at an
    existing store instead (then `close()` leaves that store alone); `extra_storage_conf` is appended
    to the storage.conf (e.g. an additionalimagestores drop-in).
    """

    workdir: Path
    graphroot: Path | None = None
    runroot: Path = field(default=Path())
    extra_storage_conf: str = ""
    env: dict[str, str] = field(init=False, repr=False)
    _own_runroot: bool = field(init=False, default=False, repr=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.runroot == Path():
            # podman refuses a runroot longer than 50 characters: keep it short, outside workdir.
            self.runroot = Path(tempfile.mkdtemp(prefix="scratch-", dir="/tmp"))
            self._own_runroot = True
        self.env = pinned_env(self.workdir, self.root, self.runroot, self.extra_storage_conf)

    @property
    def root(self) -> Path:
        return self.graphroot or self.workdir / "root"

    def __call__(self, *args: str | Path) -> str:
        # Root, runroot and driver come from the storage.conf only: podman drops the conf's storage
        # options (additionalimagestores among them) when --root/--storage-driver are given.
        return run(["podman", *args], env=self.env).stdout.strip()

    def images(self) -> list[dict[str, object]]:
        """`podman images --format json`, as podman itself reports them."""
        out: list[dict[str, object]] = json.loads(self("images", "--format", "json") or "[]")
        return out

    def close(self) -> None:
        unmount_under(self.workdir)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self._own_runroot:
            unmount_under(self.runroot)
            shutil.rmtree(self.runroot, ignore_errors=True)
