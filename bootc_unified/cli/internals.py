"""`bootc-unified internals ...`: low-level verbs used by people debugging and by outside checks.

Groups: `verity` (fs-verity digests, here), `cfs` (the composefs repository, cli/cfs.py) and
`cstor` (a containers-storage read directly, cli/cstor.py); and the hidden `finalize-staged`
(cli/deploy.py), the finalize unit's ExecStop; `gc` (both stores, deploy/gc.py; bootc calls it
`internals composefs-gc`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bootc_unified import verity
from bootc_unified.errors import UserError

from . import cfs, cstor, deploy, ostree

if TYPE_CHECKING:
    from bootc_unified.deploy.gc import GcOpts


def register(sub: Any) -> None:
    p = sub.add_parser("internals", help="low-level verbs (verity, cfs, cstor)")
    groups = p.add_subparsers(dest="group", required=True, metavar="GROUP")
    _register_verity(groups)
    cfs.register(groups)
    cstor.register(groups)
    ostree.register(groups)
    deploy.register_internals(groups)
    _register_gc(groups)


# --- verity -----------------------------------------------------------------------------------


def _register_verity(groups: Any) -> None:
    p = groups.add_parser("verity", help="fs-verity digests")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    d = verbs.add_parser("digest", help="print fs-verity digests like `fsverity digest`")
    d.add_argument("--hash", choices=["sha256", "sha512"], default="sha256")
    d.add_argument("files", nargs="+", type=Path, metavar="FILE")
    d.set_defaults(func=_verity_digest)


def _verity_digest(args: argparse.Namespace) -> int:
    from bootc_unified.repository.objects import open_source

    alg = verity.HashAlg.from_name(args.hash)
    for path in args.files:
        fd = open_source(path)  # a regular file, or a one-line error naming it
        try:
            digest = verity.digest_fd(fd, alg)
        except OSError as e:
            raise UserError(f"{path}: {e.strerror}") from e
        finally:
            os.close(fd)
        print(f"{alg.label}:{digest.hex()} {path}")
    return 0


# --- gc ---------------------------------------------------------------------------------------


def _register_gc(groups: Any) -> None:
    p = groups.add_parser("gc", help="remove what no live deployment needs (both stores, state, ESP)")
    p.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")
    p.add_argument("--format", choices=["humanreadable", "json"], default="humanreadable")
    p.add_argument("--sysroot", type=Path, default=Path("/sysroot"), metavar="DIR")
    p.add_argument("--esp", type=Path, metavar="DIR", help="default: the mounted vfat ESP")
    p.add_argument(
        "--system-store",
        type=Path,
        default=Path("/var/lib/containers/storage"),
        metavar="DIR",
        help="the system's containers-storage, whose images may stand on the bootc store's layers",
    )
    p.add_argument("--mountinfo", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--staged-marker", type=Path, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_gc)


def gc_opts(args: argparse.Namespace) -> GcOpts:
    """The GcOpts of `internals gc` / `image list` arguments (the ESP found as status finds it)."""
    from bootc_unified.deploy import sysroot
    from bootc_unified.deploy.gc import GcOpts
    from bootc_unified.deploy.staged import MARKER

    mountinfo = args.mountinfo or sysroot.MOUNTINFO
    esp = args.esp or sysroot.default_esp(mountinfo, args.sysroot)
    return GcOpts(
        sysroot=args.sysroot,
        esp=esp,
        dry_run=getattr(args, "dry_run", False),
        mountinfo=mountinfo,
        staged_marker=getattr(args, "staged_marker", None) or MARKER,
        system_store=args.system_store,
    )


def _gc(args: argparse.Namespace) -> int:
    import json
    import sys

    from bootc_unified.deploy.gc import gc

    report = gc(gc_opts(args))
    if args.format == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        sys.stdout.write(report.render())
    return 0
