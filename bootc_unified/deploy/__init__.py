"""Deployments: the system layer that install, status (and later upgrade, switch, rollback, GC)
operate on, laid out as bootc's composefs backend does (reference/deployments.md).

    <root>/composefs/                      repository (objects, streams, images; SHA-512 verity ids)
    <root>/ostree/bootc/storage/           bootc-owned containers-storage
    <root>/state/deploy/<id>/              etc/ (writable copy), var -> ../../os/default/var, <id>.origin
    <root>/state/os/default/var/           one /var shared by all deployments
    <ESP>/loader/entries[.staged]/         BLS type 1 entries, options ... composefs=[?]<id>
    <ESP>/EFI/Linux/bootc_composefs-<id>/  vmlinuz, initrd (shared between deployments with equal bytes)
    /run/composefs/staged-deployment       staged marker (JSON)

`<id>` is the fs-verity digest of the deployment's EROFS image.

Modules: spec (status document), sysroot (paths, booted id), origin, bls, osrelease, kargs, staged,
state (state dir, /var seed), status, install (to-filesystem), disk (to-disk pre-flight and
partitioning), stage, finalize, etcmerge, rollback, lbi, gc, upgrade and switch (their shared steps
in update; remote: the registry's manifest without pulling; softreboot: /run/nextroot).

Layer: imports repository, erofs, cstorage, imgstore, importer, progress and boot.cmdline; imported
only by cli.
"""

from bootc_unified.deploy.spec import Host
from bootc_unified.deploy.sysroot import Esp, Sysroot

__all__ = ["Esp", "Host", "Sysroot"]
