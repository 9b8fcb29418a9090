"""buildah with a private store inside the build cache (never the host's /var/lib/containers).

Each method is one explicit `buildah` call. The store survives between runs: it *is* the image
cache, looked up by tag.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.cache import digest, subdir
from harness.run import CommandError, run

BUILDAH_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Buildah:
    root: Path
    runroot: Path

    @classmethod
    def cached(cls) -> Buildah:
        root = subdir("containers-storage")
        # Run-time state (locks, mounts) on tmpfs, one directory per store.
        runroot = Path("/run/bootc-unified") / f"buildah-{digest(str(root))}"
        runroot.mkdir(parents=True, exist_ok=True)
        return cls(root=root, runroot=runroot)

    def __call__(self, *args: str | Path, timeout: float = BUILDAH_TIMEOUT) -> str:
        argv: list[str | Path] = ["buildah", "--root", self.root, "--runroot", self.runroot, *args]
        return run(argv, timeout=timeout).stdout.strip()

    def image_id(self, tag: str) -> str | None:
        """The ID of the image called `tag`, or None when there is none."""
        try:
            out = self("inspect", "--type", "image", "--format", "{{.FromImageID}}", tag)
        except CommandError:
            return None
        return out or None

    def from_(self, image: str) -> str:
        return self("from", "--pull-never", image) if image != "scratch" else self("from", "scratch")

    def run(self, container: str, *argv: str) -> str:
        """Run `argv` inside the container (chroot isolation: no OCI runtime, host network)."""
        return self("run", "--isolation", "chroot", container, "--", *argv)

    def add_tarball(self, container: str, tarball: Path) -> None:
        self("add", container, tarball, "/")

    def config(self, container: str, cmd: list[str], labels: dict[str, str]) -> None:
        args: list[str | Path] = []
        if cmd:
            args += ["--cmd", json.dumps(cmd)]
        for key, value in labels.items():
            args += ["--label", f"{key}={value}"]
        if args:
            self("config", *args, container)

    @contextmanager
    def mounted(self, container: str) -> Iterator[Path]:
        path = Path(self("mount", container))
        try:
            yield path
        finally:
            self("umount", container)

    def commit(self, container: str, tag: str) -> str:
        """Commit the container's changes as one new layer; returns the image ID."""
        return self("commit", "--quiet", "--format", "oci", "--rm", container, tag)

    def remove_container(self, container: str) -> None:
        run(["buildah", "--root", self.root, "--runroot", self.runroot, "rm", container], check=False)

    def push(self, tag: str, destination: str, compress: bool = False) -> None:
        args: list[str | Path] = ["push", "--quiet", "--tls-verify=false", "--format", "oci"]
        if not compress:
            args.append("--disable-compression")
        self(*args, tag, destination)

    def layers(self, tag: str) -> list[str]:
        """The image's layer DiffIDs, base first."""
        info = json.loads(self("inspect", "--type", "image", tag))
        diff_ids: list[str] = info["OCIv1"]["rootfs"]["diff_ids"]
        return diff_ids
