"""`bootc-unified internals ...`: low-level verbs used by people debugging and by outside checks.

Groups: `verity` (fs-verity digests, here), `cfs` (the composefs repository, cli/cfs.py) and
`cstor` (a containers-storage read directly, cli/cstor.py).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from bootc_unified import verity
from bootc_unified.errors import UserError

from . import cfs, cstor


def register(sub: Any) -> None:
    p = sub.add_parser("internals", help="low-level verbs (verity, cfs, cstor)")
    groups = p.add_subparsers(dest="group", required=True, metavar="GROUP")
    _register_verity(groups)
    cfs.register(groups)
    cstor.register(groups)


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
