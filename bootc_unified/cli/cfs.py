"""`bootc-unified internals cfs --repo DIR ...`: the composefs repository (objects, import, images,
GC, fsck)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bootc_unified import verity
from bootc_unified.errors import UserError


def register(groups: Any) -> None:
    p = groups.add_parser("cfs", help="the composefs repository")
    p.add_argument("--repo", type=Path, required=True, metavar="DIR")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    init = verbs.add_parser("init", help="create a repository")
    init.add_argument("--hash", choices=["sha256", "sha512"], default="sha512")
    init.add_argument("--insecure", action="store_true", help="no fs-verity on objects")
    init.set_defaults(func=_cfs_init)

    add = verbs.add_parser("add", help="add files as objects (reflink, else hardlink, else copy)")
    add.add_argument("--zerocopy", action="store_true", help="fail rather than copy data")
    add.add_argument("files", nargs="+", type=Path, metavar="FILE")
    add.set_defaults(func=_cfs_add)

    fsck = verbs.add_parser("fsck", help="check objects, streams, refs and images")
    fsck.set_defaults(func=_cfs_fsck)

    rec = verbs.add_parser("recover", help="after an interrupted write: remove the damaged objects it left")
    rec.set_defaults(func=_cfs_recover)

    imp = verbs.add_parser("import", help="import an image from a containers-storage (zero-copy)")
    imp.add_argument("--zerocopy", action="store_true", help="fail rather than copy data")
    imp.add_argument("--storage", type=Path, required=True, metavar="ROOT")
    imp.add_argument("image", metavar="IMAGE")
    imp.set_defaults(func=_cfs_import)

    create = verbs.add_parser("create-image", help="(re)build the EROFS image of an imported image")
    create.add_argument("image", metavar="IMAGE")
    create.set_defaults(func=_cfs_create_image)

    mnt = verbs.add_parser("mount", help="mount an EROFS image (erofs + overlay on the objects)")
    mnt.add_argument("image", metavar="IMAGE_ID", help="an image ID, or the name of an imported image")
    mnt.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    mnt.set_defaults(func=_cfs_mount, private_mounts=False)  # the mount is the point: keep it

    gc = verbs.add_parser("gc", help="remove objects, streams and images no ref reaches")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    gc.set_defaults(func=_cfs_gc)

    ls = verbs.add_parser("ls-refs", help="list refs and the objects they name")
    ls.set_defaults(func=_cfs_ls_refs)


def _cfs_init(args: argparse.Namespace) -> int:
    from bootc_unified.repository import Repository

    repo = Repository.init(args.repo, verity.HashAlg.from_name(args.hash), insecure=args.insecure)
    print(json.dumps({"repo": str(repo.path), "algorithm": repo.meta.algorithm, "insecure": repo.insecure}))
    return 0


def _cfs_add(args: argparse.Namespace) -> int:
    from bootc_unified.repository import Repository

    repo = Repository.open(args.repo)
    with repo.writer_lock():
        for path in args.files:
            result = repo.ensure_object_from_file(path, zerocopy=args.zerocopy)
            out = {
                "path": str(path),
                "object_id": result.object_id,
                "method": result.method.value,
                "bytes": result.size,
            }
            print(json.dumps(out), flush=True)
    return 0


def _cfs_import(args: argparse.Namespace) -> int:
    from bootc_unified.cstorage import Store
    from bootc_unified.importer import import_image
    from bootc_unified.repository import Repository

    repo = Repository.open(args.repo)
    result = import_image(repo, Store.open(args.storage), args.image, zerocopy=args.zerocopy)
    print(json.dumps(result.to_json()))
    return 0


def _cfs_create_image(args: argparse.Namespace) -> int:
    from bootc_unified.importer import recreate_image
    from bootc_unified.repository import Repository

    print(recreate_image(Repository.open(args.repo), args.image))
    return 0


def _cfs_mount(args: argparse.Namespace) -> int:
    from bootc_unified.erofs.mount import mount
    from bootc_unified.importer import image_ref_name
    from bootc_unified.repository import Repository
    from bootc_unified.repository.refs import object_id_of

    repo = Repository.open(args.repo)
    image_id = args.image
    if not (repo.path / "images" / image_id).is_symlink():
        image_id = object_id_of(repo.path / "images" / "refs" / image_ref_name(args.image), repo.objects.dir)
        if image_id is None:
            raise UserError(f"{repo.path}: no image {args.image!r} (neither an image ID nor an image name)")
    verity_mode = "off" if repo.insecure else "require"
    mount(repo.image_path(image_id), repo.objects.dir, args.mountpoint, verity_mode)
    return 0


def _cfs_gc(args: argparse.Namespace) -> int:
    from bootc_unified.repository import Repository

    result = Repository.open(args.repo).gc(dry_run=args.dry_run)
    print(json.dumps({"dry_run": args.dry_run, **result.to_json()}))
    return 0


def _cfs_ls_refs(args: argparse.Namespace) -> int:
    from bootc_unified.repository import Repository

    for name, target in Repository.open(args.repo).refs().items():
        print(f"{name} {target or '(broken)'}")
    return 0


def _cfs_recover(args: argparse.Namespace) -> int:
    from bootc_unified.repository import Repository

    report = Repository.open(args.repo).recover()
    print(report.line(args.repo) if report else f"{args.repo}: nothing to recover")
    return 0


def _cfs_fsck(args: argparse.Namespace) -> int:
    from bootc_unified.repository import Repository

    repo = Repository.open(args.repo)
    report = repo.fsck()
    for problem in report.problems:
        print(problem)
    print(f"fsck: {report.objects} objects checked, {len(report.problems)} problems", file=sys.stderr)
    return 0 if report.ok else 1
