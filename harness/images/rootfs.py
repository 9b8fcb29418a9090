"""The guest rootfs: one mmdebstrap tarball per base definition, cached by its hash.

The tarball and a manifest of installed package versions (`dpkg-query -W`) sit next to each other
in `<cache>/rootfs/`; the manifest is part of every image key built on top, so the images change
when the packages do. Bump `epoch` in base.toml to rebuild with newer packages.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness.cache import digest, file_lock, subdir
from harness.images.definitions import BaseDef
from harness.run import run

ROOTFS_BUILD_TIMEOUT = 1800.0
# Smaller rootfs, same function: no manuals, docs (except copyright) or translations.
DPKG_EXCLUDES = [
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
]


@dataclass(frozen=True)
class Rootfs:
    key: str
    tarball: Path
    manifest: Path
    built_seconds: float  # 0.0 when it came from the cache


def rootfs_key(base: BaseDef) -> str:
    return digest("rootfs-v2", base.raw)


def mmdebstrap_argv(base: BaseDef, overlay: Path, manifest: Path, out: Path) -> list[str]:
    argv = [
        "mmdebstrap",
        "--mode=root",
        f"--variant={base.variant}",
        f"--components={','.join(base.components)}",
        f"--include={','.join(base.packages)}",
        "--skip=output/dev",  # device nodes do not belong in an OCI layer; devtmpfs provides them
        '--aptopt=Acquire::Retries "3"',
        *(f"--dpkgopt={o}" for o in DPKG_EXCLUDES),
        f"--customize-hook=sync-in {overlay} /",
        f'--customize-hook=echo {shlex.quote(base.hostname)} > "$1/etc/hostname"',
    ]
    argv += [f'--customize-hook=chroot "$1" sh -c {shlex.quote(c)}' for c in base.commands]
    argv += [
        f'--customize-hook=chroot "$1" dpkg-query -W > {shlex.quote(str(manifest))}',
        base.suite,
        str(out),
        base.mirror,
    ]
    return argv


def build_rootfs(base: BaseDef) -> Rootfs:
    """The cached tarball for `base`, building it (under a lock) when it is missing."""
    key = rootfs_key(base)
    cache = subdir("rootfs")
    tarball, manifest = cache / f"{key}.tar", cache / f"{key}.manifest"
    with file_lock(f"rootfs-{key}"):
        if tarball.is_file() and manifest.is_file():
            return Rootfs(key, tarball, manifest, 0.0)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".{key}-") as tmp:
            overlay = Path(tmp) / "overlay"
            for path, content in base.files.items():
                dest = overlay / path.lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(content.lstrip("\n"))
            part_tar, part_manifest = Path(tmp) / "rootfs.tar", Path(tmp) / "manifest"
            env = {**os.environ, "TMPDIR": tmp}
            run(
                mmdebstrap_argv(base, overlay, part_manifest, part_tar), timeout=ROOTFS_BUILD_TIMEOUT, env=env
            )
            shutil.move(part_manifest, manifest)
            os.replace(part_tar, tarball)  # last: the tarball's presence marks the entry complete
        return Rootfs(key, tarball, manifest, time.monotonic() - started)
