"""Per-deployment state on the physical root (bootc `BC/state.rs` `write_composefs_state`).

    state/deploy/<id>/etc/          writable copy of the image's /etc (owners, modes, xattrs,
                                    symlinks kept; `etc/.updated` removed so ConditionNeedsUpdate=/etc
                                    units run on first boot)
    state/deploy/<id>/var           -> ../../os/default/var
    state/deploy/<id>/<id>.origin   (origin.py)
    state/os/default/var/           one /var for all deployments, seeded from the image's /var at install

The deployment dir is built under a temporary name beside it and renamed into place, so it either
exists complete or not at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bootc_unified.deploy.origin import Origin
from bootc_unified.deploy.sysroot import Sysroot
from bootc_unified.errors import UserError
from bootc_unified.repository import fsync_dir

VAR_LINK = "../../os/default/var"


def _cp_a(src: Path, dest: Path) -> None:
    proc = subprocess.run(["cp", "-a", "--", str(src), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"copying {src} to {dest}: {last}")


def private_state_dir(sysroot: Sysroot) -> None:
    """`state/` exists, root's only (0700): the deployments' /etc copies hold secrets (shadow, keys),
    reachable by others only through the bind mounts the boot makes of them. An older, wider
    state dir is narrowed."""
    sysroot.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    if sysroot.state.stat().st_mode & 0o777 != 0o700:
        os.chmod(sysroot.state, 0o700)


def write_deployment(sysroot: Sysroot, depl_id: str, image_root: Path, origin: Origin) -> Path:
    """Create state/deploy/<id>/ from the image mounted at `image_root`; returns its path."""
    final = sysroot.deployment(depl_id)
    if final.exists():
        raise UserError(f"{final}: deployment state already exists")
    private_state_dir(sysroot)
    sysroot.deploy_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{depl_id[:16]}.", dir=sysroot.deploy_dir))  # 0700
    try:
        etc = image_root / "etc"
        if etc.is_dir() and not etc.is_symlink():
            _cp_a(etc, tmp / "etc")
        else:
            (tmp / "etc").mkdir(0o755)
        (tmp / "etc" / ".updated").unlink(missing_ok=True)
        os.symlink(VAR_LINK, tmp / "var")
        origin.write(tmp / f"{depl_id}.origin")
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(sysroot.deploy_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def seed_var(sysroot: Sysroot, image_root: Path) -> bool:
    """Fill state/os/default/var from the image's /var, once; False when it already exists."""
    target = sysroot.shared_var
    if target.exists():
        return False
    private_state_dir(sysroot)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".var.", dir=target.parent))
    try:
        var = image_root / "var"
        if var.is_dir() and not var.is_symlink():
            os.rmdir(tmp)
            _cp_a(var, tmp)
        else:
            os.chmod(tmp, 0o755)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True
