"""`bootc-unified image ...`: the bootc-owned containers-storage, driven through podman.

    image pull REF [--policy missing|always] [--tls-verify true|false] [--progress-fd N]
    image list [--format table|json]                  the store's images (ID, digest, names)
    image list --type all|host|logical [--format table|json] [--esp DIR]
                                bootc's listing (REPOSITORY TYPE), plus why GC keeps each image
    image exists REF            (exit 0 if present, 1 if not)
    image rm REF...
    image prune [ROOT...] | --all
    image copy-from-host IMAGE
    image dropin [--output FILE]
    image set-unified [--tls-verify true|false] [--progress-fd N] [--format humanreadable|json]
                      [--backend composefs|ostree]
                                the booted image into the store (registry by digest, else rebuilt
                                from the repository), its files sharing data with the repository

Every verb takes `--sysroot DIR` (default /sysroot); the store is <sysroot>/ostree/bootc/storage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bootc_unified import imgstore, progress
from bootc_unified.errors import UserError

if TYPE_CHECKING:
    from bootc_unified.deploy.gc import GcReport, StoreVerdict
    from bootc_unified.deploy.setunified import SetUnifiedOpts


def register(sub: Any) -> None:
    p = sub.add_parser("image", help="images in the bootc-owned containers-storage")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        v: argparse.ArgumentParser = verbs.add_parser(name, help=help)
        v.add_argument("--sysroot", type=Path, default=Path("/sysroot"), metavar="DIR")
        v.add_argument("--authfile", type=Path, help="registry credentials (default: none)")
        return v

    pull = verb("pull", "pull an image into the store (creating the store if needed)")
    pull.add_argument("ref", metavar="REF")
    pull.add_argument("--policy", choices=[p.value for p in imgstore.PullPolicy], default="missing")
    pull.add_argument("--tls-verify", choices=["true", "false"], default="true")
    pull.add_argument("--progress-fd", type=int, metavar="N", help="write bootc progress JSON lines to fd N")
    pull.set_defaults(func=_pull)

    ls = verb("list", "list the images in the store (with --type: bootc's listing and GC reasons)")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    ls.add_argument(
        "--type",
        choices=["all", "host", "logical"],
        default=None,
        help="host: the live deployments' images; logical: their bound images; all: those and every "
        "name in the store (unified)",
    )
    ls.add_argument("--esp", type=Path, metavar="DIR", help="default: the mounted vfat ESP")
    ls.add_argument(
        "--system-store", type=Path, default=Path("/var/lib/containers/storage"), help=argparse.SUPPRESS
    )
    ls.add_argument("--mountinfo", type=Path, default=None, help=argparse.SUPPRESS)
    ls.set_defaults(func=_list)

    ex = verb("exists", "exit 0 if REF is in the store, 1 if not")
    ex.add_argument("ref", metavar="REF")
    ex.set_defaults(func=_exists)

    rm = verb("rm", "remove images (a name untags; an ID or digest removes)")
    rm.add_argument("refs", nargs="+", metavar="REF")
    rm.set_defaults(func=_rm)

    prune = verb("prune", "remove every image not named by a ROOT (name, ID or digest)")
    prune.add_argument("roots", nargs="*", metavar="ROOT")
    prune.add_argument("--all", action="store_true", help="no roots: remove every image")
    prune.set_defaults(func=_prune)

    copy = verb("copy-from-host", "copy an image from the host's podman storage into the store")
    copy.add_argument("image", metavar="IMAGE")
    copy.set_defaults(func=_copy)

    dropin = verb("dropin", "print (or write) a storage.conf making the store an additional image store")
    dropin.add_argument("--output", type=Path, metavar="FILE")
    dropin.set_defaults(func=_dropin)

    su = verb("set-unified", "put the booted image into the store, sharing its files with the repository")
    su.add_argument("--tls-verify", choices=["true", "false"], default="true")
    su.add_argument("--progress-fd", type=int, metavar="N", help="write bootc progress JSON lines to fd N")
    su.add_argument("--format", choices=["humanreadable", "json"], default="humanreadable")
    su.add_argument("--mountinfo", type=Path, default=None, help=argparse.SUPPRESS)
    su.add_argument(
        "--backend",
        choices=["composefs", "ostree"],
        default="composefs",
        help="the sysroot's backend: ostree re-imports the deployed image from the store into "
        "<sysroot>/ostree/repo and shares the objects' data with the store's files",
    )
    su.set_defaults(func=_set_unified)


def _progress_fd(fd: int | None) -> int | None:
    if fd is None:
        return None
    if fd in (0, 1, 2):
        raise UserError(f"--progress-fd {fd}: use a descriptor other than stdin, stdout or stderr")
    try:
        os.fstat(fd)
    except OSError as e:
        raise UserError(f"--progress-fd {fd}: {e.strerror}") from e
    return fd


def _store(args: argparse.Namespace) -> imgstore.ImageStore:
    """The bootc store. podman writes its database even to list images, so a booted system's
    read-only /sysroot is made writable for this command first (a private remount)."""
    _writable(args)
    return imgstore.ImageStore.open(args.sysroot, args.authfile)


def _writable(args: argparse.Namespace) -> None:
    from bootc_unified.deploy.finalize import writable_sysroot

    if Path(args.sysroot).is_dir():  # a missing sysroot: the store's own error names it
        writable_sysroot(Path(args.sysroot))


def _pull(args: argparse.Namespace) -> int:
    _writable(args)
    sink = progress.for_cli(_progress_fd(args.progress_fd))
    try:
        image = imgstore.pull_into(
            args.sysroot,
            args.ref,
            imgstore.PullPolicy(args.policy),
            tls_verify=args.tls_verify == "true",
            progress=sink,
            authfile=args.authfile,
        )
    finally:
        sink.close()
    print(image.id)
    return 0


def _list(args: argparse.Namespace) -> int:
    if args.type is not None:
        return _list_typed(args)
    images = _store(args).images()
    if args.format == "json":
        print(json.dumps([i.to_json() for i in images], indent=2))
        return 0
    rows = [("ID", "DIGEST", "NAMES")]
    rows += [(i.id[:12], i.digest, ", ".join(i.names) or "<none>") for i in images]
    width = [max(len(r[c]) for r in rows) for c in range(2)]
    for r in rows:
        print(f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]}")
    return 0


def _exists(args: argparse.Namespace) -> int:
    return 0 if _store(args).exists(args.ref) else 1


def _rm(args: argparse.Namespace) -> int:
    store = _store(args)
    for ref in args.refs:
        image = store.remove(ref)
        print(f"{ref} {image.id}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    if not args.roots and not args.all:
        raise UserError("prune: name the images to keep (ROOT...), or pass --all to remove every image")
    store = _store(args)
    for image in store.prune_except_roots(args.roots):
        print(json.dumps(image.to_json()))
    return 0


def _copy(args: argparse.Namespace) -> int:
    store = imgstore.ImageStore.ensure(args.sysroot, args.authfile)
    print(store.copy_from_host(args.image).id)
    return 0


def _dropin(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.output:
        store.write_dropin(args.output)
    else:
        sys.stdout.write(store.dropin_text())
    return 0


def set_unified_opts(args: argparse.Namespace) -> SetUnifiedOpts:
    from bootc_unified.deploy.setunified import SetUnifiedOpts

    return SetUnifiedOpts(
        sysroot=args.sysroot,
        mountinfo=args.mountinfo,
        tls_verify=args.tls_verify == "true",
        authfile=args.authfile,
        progress_fd=args.progress_fd,
    )


def _set_unified(args: argparse.Namespace) -> int:
    from bootc_unified.deploy.setunified import set_unified

    opts = set_unified_opts(args)
    sink = progress.for_cli(_progress_fd(opts.progress_fd))
    result: Any
    try:
        if args.backend == "ostree":
            from bootc_unified.ostree.setunified import set_unified as set_unified_ostree

            result = set_unified_ostree(opts.sysroot, opts.tls_verify, opts.authfile, progress=sink)
            if (warning := result.imported.warning()) is not None:
                print(warning, file=sys.stderr)
        else:
            result = set_unified(opts, sink)
    finally:
        sink.close()
    if args.format == "json":
        print(json.dumps(result.to_json(), indent=2))
    else:
        sys.stdout.write(result.summary())
    return 0


def image_rows(report: GcReport, verdicts: list[StoreVerdict], kind: str) -> list[dict[str, object]]:
    """bootc's `image list` rows (`image_type`, `image`) plus `kept_because`: why GC keeps it
    (empty: the next `internals gc` removes it).

    host = each live deployment's image (from its .origin; held by the repository, as ostree holds
    bootc's host images); unified = every name in the bootc store; logical = the bound images of
    the live deployments (bootc reads the running `/` only).
    """
    rows: list[dict[str, object]] = []
    if kind in ("all", "host"):
        seen: dict[str, list[str]] = {}
        for dep in report.live:
            if dep.origin is not None:
                seen.setdefault(dep.origin.imgref.image, []).append(f"host image of the {dep.label}")
        rows += [{"image_type": "host", "image": k, "kept_because": v} for k, v in seen.items()]
    if kind == "all":
        for v in verdicts:
            rows += [{"image_type": "unified", "image": n, "kept_because": v.reasons} for n in v.names]
    if kind in ("all", "logical"):
        bound: dict[str, list[str]] = {}
        for dep in report.live:
            for b in dep.bound:
                bound.setdefault(b.image, []).append(f"bound by {b.file} in the {dep.label}")
        rows += [{"image_type": "logical", "image": k, "kept_because": v} for k, v in bound.items()]
    return rows


def _list_typed(args: argparse.Namespace) -> int:
    from bootc_unified.deploy.gc import live_roots

    from .internals import gc_opts

    report, verdicts = live_roots(gc_opts(args))
    rows = image_rows(report, verdicts, args.type)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    table = [("REPOSITORY", "TYPE", "KEPT BECAUSE")]
    for r in rows:
        reasons = r["kept_because"]
        assert isinstance(reasons, list)
        table.append((str(r["image"]), str(r["image_type"]), "; ".join(reasons) or "- (not a GC root)"))
    width = [max(len(t[c]) for t in table) for c in range(2)]
    for t in table:
        print(f"{t[0]:<{width[0]}} {t[1]:<{width[1]}} {t[2]}")
    return 0
