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


@dataclass
class ScratchPodman:
    workdir: Path
    env: dict[str, str] = field(init=False, repr=False)
    runroot: Path = field(init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # podman refuses a runroot longer than 50 characters: keep it short, outside workdir.
        self.runroot = Path(tempfile.mkdtemp(prefix="scratch-", dir="/tmp"))
        conf = self.workdir / "storage.conf"
        conf.write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f"graphroot = {json.dumps(str(self.root))}\n"
            f"runroot = {json.dumps(str(self.runroot))}\n"
            "[storage.options.overlay]\n"
            'skip_mount_home = "true"\n'
        )
        registries = self.workdir / "registries.conf"
        registries.write_text('unqualified-search-registries = []\nshort-name-mode = "enforcing"\n')
        auth = self.workdir / "auth.json"
        auth.write_text('{"auths": {}}\n')
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CONTAINERS_", "REGISTRY_AUTH"))},
            "CONTAINERS_STORAGE_CONF": str(conf),
            "CONTAINERS_REGISTRIES_CONF": str(registries),
            "REGISTRY_AUTH_FILE": str(auth),
        }

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    def __call__(self, *args: str | Path) -> str:
        argv = [
            "podman",
            "--root",
            self.root,
            "--runroot",
            self.runroot,
            "--storage-driver",
            "overlay",
            *args,
        ]
        return run(argv, env=self.env).stdout.strip()

    def images(self) -> list[dict[str, object]]:
        """`podman images --format json`, as podman itself reports them."""
        out: list[dict[str, object]] = json.loads(self("images", "--format", "json") or "[]")
        return out

    def close(self) -> None:
        unmount_under(self.workdir)
        shutil.rmtree(self.workdir, ignore_errors=True)
        unmount_under(self.runroot)
        shutil.rmtree(self.runroot, ignore_errors=True)
