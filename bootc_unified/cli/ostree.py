"""`bootc-unified internals ostree (--repo DIR | --sysroot DIR) ...`: the ostree backend (bare
repository init, the zero-copy import from a containers-storage, fsck; offline deployment into an
ostree sysroot, its deployments, GC). With `--sysroot`, the repository is `<sysroot>/ostree/repo`
and the store `<sysroot>/ostree/bootc/storage` unless `--storage` says otherwise."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bootc_unified.errors import UserError


def register(groups: Any) -> None:
    p = groups.add_parser("ostree", help="the ostree backend: repository (bare mode) and sysroot")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo", type=Path, metavar="DIR")
    where.add_argument("--sysroot", type=Path, metavar="DIR", help="an ostree sysroot (its ostree/repo)")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    init = verbs.add_parser("init", help="create a bare ostree repository (with --sysroot: init-fs)")
    init.add_argument("--os", default="default", metavar="NAME", help="with --sysroot: the stateroot")
    init.set_defaults(func=_init)

    imp = verbs.add_parser("import", help="import an image from a containers-storage (zero-copy)")
    _image_args(imp)
    imp.add_argument(
        "--retain-var",
        choices=["auto", "yes", "no"],
        default="auto",
        help="keep /var as is (yes) or move it to /usr/share/factory/var (no); auto: as bootc does "
        "with the installed ostree (kept from 2024.3)",
    )
    imp.set_defaults(func=_import)

    fsck = verbs.add_parser("fsck", help="ostree fsck")
    fsck.set_defaults(func=_fsck)

    deploy = verbs.add_parser(
        "deploy", help="--sysroot only: import an image zero-copy and deploy it (ostree admin deploy)"
    )
    _image_args(deploy)
    deploy.add_argument("--os", default="default", metavar="NAME", help="the stateroot (default: default)")
    deploy.add_argument("--karg", action="append", default=[], metavar="K", help="a kernel argument")
    deploy.set_defaults(func=_deploy)

    status = verbs.add_parser("deployments", help="--sysroot only: the deployments (JSON), the default first")
    status.set_defaults(func=_deployments)

    gc = verbs.add_parser(
        "gc", help="--sysroot only: drop image refs and store images no deployment needs, prune"
    )
    gc.add_argument("--dry-run", action="store_true", help="report only")
    gc.set_defaults(func=_gc)


def _image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", type=Path, metavar="ROOT", help="default: <sysroot>/ostree/bootc/storage")
    p.add_argument(
        "--imgref",
        metavar="TRANSPORT:NAME",
        help="the image reference the ostree ref names (default registry:<the image's first name>)",
    )
    p.add_argument("image", metavar="IMAGE")


def _repo_path(args: argparse.Namespace) -> Path:
    return Path(args.repo) if args.repo is not None else Path(args.sysroot) / "ostree/repo"


def _sysroot(args: argparse.Namespace) -> Path:
    if args.sysroot is None:
        raise UserError(f"internals ostree {args.verb}: needs --sysroot, not --repo")
    return Path(args.sysroot)


def _storage(args: argparse.Namespace) -> Path:
    from bootc_unified.imgstore import store_path

    if args.storage is not None:
        return Path(args.storage)
    if args.sysroot is None:
        raise UserError(f"internals ostree {args.verb}: --storage ROOT is needed with --repo")
    return store_path(Path(args.sysroot))


def _warn(result: Any) -> None:
    if (warning := result.warning()) is not None:
        print(warning, file=sys.stderr)


def _init(args: argparse.Namespace) -> int:
    from bootc_unified.ostree.repo import OstreeRepo
    from bootc_unified.ostree.sysroot import OstreeSysroot

    if args.sysroot is not None:
        OstreeSysroot(args.sysroot).init(args.os)
        repo = OstreeRepo.open(_repo_path(args))
    else:
        repo = OstreeRepo.init(args.repo)
    print(json.dumps({"repo": str(repo.path), "mode": "bare"}))
    return 0


def _import(args: argparse.Namespace) -> int:
    from bootc_unified.cstorage import Store
    from bootc_unified.ostree.importer import import_image
    from bootc_unified.ostree.repo import OstreeRepo

    repo = OstreeRepo.open(_repo_path(args))
    store = Store.open(_storage(args))
    retain = {"auto": None, "yes": True, "no": False}[args.retain_var]
    result = import_image(repo, store, args.image, imgref=args.imgref, retain_var=retain)
    _warn(result)
    print(json.dumps(result.to_json(), indent=2))
    return 0


def _fsck(args: argparse.Namespace) -> int:
    from bootc_unified.ostree.repo import OstreeRepo

    OstreeRepo.open(_repo_path(args)).fsck()
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from bootc_unified.cstorage import Store
    from bootc_unified.ostree.sysroot import OstreeSysroot

    sysroot = OstreeSysroot(_sysroot(args))
    store = Store.open(_storage(args))
    deployment, result = sysroot.deploy(store, args.image, args.imgref, args.os, tuple(args.karg))
    _warn(result)
    print(json.dumps({"deployment": deployment.to_json(), "import": result.to_json()}, indent=2))
    return 0


def _deployments(args: argparse.Namespace) -> int:
    from bootc_unified.ostree.sysroot import OstreeSysroot

    print(json.dumps([d.to_json() for d in OstreeSysroot(_sysroot(args)).deployments()], indent=2))
    return 0


def _gc(args: argparse.Namespace) -> int:
    from bootc_unified.ostree.gc import gc

    print(json.dumps(gc(_sysroot(args), args.dry_run).to_json(), indent=2))
    return 0
