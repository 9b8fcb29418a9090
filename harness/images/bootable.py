"""Make the os layer a bootable, bootc-style image (base.toml's [bootable]), in the same layer as
our package because the initramfs carries the package's early-boot script:

    /usr/lib/modules/<kver>/vmlinuz, initramfs.img   kernel; initramfs built here by mkinitramfs
    /boot/vmlinuz-<kver>, initrd.img-<kver>           symlinks to those (what the plain disks boot)
    /usr/share/initramfs-tools/{hooks,scripts}/...    bootc_unified/boot/initramfs/
    /usr/lib/systemd/system/*                         bootc_unified/boot/units/, enabled
    /etc/containers/storage.conf                      the package's /usr/share one, every setting
                                                      kept, plus additionalimagestores
    files, symlinks, directories                      e.g. kargs.d, /usr/lib/bootc/storage, /sysroot
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

from harness.images.buildah import Buildah
from harness.images.definitions import BootableDef, DefinitionError

INITRAMFS_TOOLS = "/usr/share/initramfs-tools"
UNIT_DIR = "/usr/lib/systemd/system"
STORAGE_CONF = "/usr/share/containers/storage.conf"
ETC_STORAGE_CONF = "/etc/containers/storage.conf"


def make_bootable(buildah: Buildah, container: str, root: Path, bootable: BootableDef, source: Path) -> None:
    """Apply `bootable` to the mounted `container` at `root`; `source` is the source tree root."""
    from harness.images.build import inside  # build imports this module

    for sub in ("hooks", "scripts"):
        tree = source / bootable.initramfs / sub
        if not tree.is_dir():
            raise DefinitionError(f"{tree}: no initramfs {sub}/ directory")
        for src in sorted(p for p in tree.rglob("*") if p.is_file()):
            dest = inside(root, f"{INITRAMFS_TOOLS}/{sub}/{src.relative_to(tree)}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            dest.chmod(0o755)
    units = sorted(p for p in (source / bootable.units).glob("*") if p.is_file())
    for unit in units:
        dest = inside(root, f"{UNIT_DIR}/{unit.name}")
        shutil.copyfile(unit, dest)
        dest.chmod(0o644)
    for directory in bootable.directories:
        inside(root, directory).mkdir(mode=0o755, parents=True, exist_ok=True)
    for path, link in bootable.symlinks.items():
        target = inside(root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(link)
    for path, content in bootable.files.items():
        target = inside(root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(0o644)

    original = inside(root, STORAGE_CONF)
    if not original.is_file():
        raise DefinitionError(f"the image has no {STORAGE_CONF} (Debian package containers-storage)")
    conf = inside(root, ETC_STORAGE_CONF)
    conf.write_text(storage_conf(original.read_text(), bootable.additional_image_store))
    conf.chmod(0o644)

    kver = kernel_version(root)
    modules = f"/usr/lib/modules/{kver}"
    shutil.copy2(inside(root, f"/boot/vmlinuz-{kver}"), inside(root, f"{modules}/vmlinuz"))
    buildah.run(container, "mkinitramfs", "-o", f"{modules}/initramfs.img", kver)
    for name, file in ((f"vmlinuz-{kver}", "vmlinuz"), (f"initrd.img-{kver}", "initramfs.img")):
        boot_link = inside(root, f"/boot/{name}")
        boot_link.unlink(missing_ok=True)
        boot_link.symlink_to(f"..{modules}/{file}")
    if units:
        buildah.run(container, "systemctl", "enable", *(u.name for u in units))


def kernel_version(root: Path) -> str:
    """The one kernel version the image has modules for."""
    versions = sorted(p.name for p in (root / "usr/lib/modules").iterdir() if p.is_dir())
    if len(versions) != 1:
        found = ", ".join(versions) or "none"
        raise DefinitionError(f"expected one kernel in the image's /usr/lib/modules, found {found}")
    return versions[0]


_STORES = re.compile(r"^additionalimagestores\s*=\s*\[[^\]]*\]", re.MULTILINE)
_OPTIONS = re.compile(r"^\[storage\.options\][ \t]*$", re.MULTILINE)


def storage_conf(original: str, store: str) -> str:
    """`original` (containers-storage's storage.conf) with `store` as the one additional image
    store. podman reads exactly one storage.conf, so every other setting must stay: checked by
    parsing both."""
    line = f"additionalimagestores = [{json.dumps(store)}]"
    if _STORES.search(original):
        text = _STORES.sub(lambda _: line, original, count=1)
    elif _OPTIONS.search(original):
        text = _OPTIONS.sub(lambda m: f"{m.group(0)}\n{line}", original, count=1)
    else:
        raise DefinitionError(f"{STORAGE_CONF} has no [storage.options] table")
    expected: dict[str, Any] = copy.deepcopy(tomllib.loads(original))
    expected["storage"]["options"]["additionalimagestores"] = [store]
    if tomllib.loads(text) != expected:
        raise DefinitionError(f"adding additionalimagestores to {STORAGE_CONF} changed other settings")
    header = f"# {STORAGE_CONF} plus the bootc image store (written by the bootc-unified image build)\n"
    return header + text
