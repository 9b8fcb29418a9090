"""`bootc-unified internals cstor --storage ROOT ...`: read an overlay containers-storage directly.

inspect IMAGE            JSON: id, names, digest, manifest, config, layers (DiffID, paths, sizes)
layer-tar IMAGE DIFFID   the layer's tar on stdout, rebuilt from tar-split + diff/; exits 1 with
                         a one-line error if its sha256 is not the DiffID
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(groups: Any) -> None:
    p = groups.add_parser("cstor", help="read an overlay containers-storage (no podman)")
    p.add_argument("--storage", required=True, metavar="ROOT", type=Path)
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    ins = verbs.add_parser("inspect", help="print an image's manifest, config and layers as JSON")
    ins.add_argument("image", metavar="IMAGE")
    ins.set_defaults(func=_inspect)

    tar = verbs.add_parser("layer-tar", help="write a layer tar to stdout, verified against its DiffID")
    tar.add_argument("image", metavar="IMAGE")
    tar.add_argument("diff_id", metavar="DIFFID")
    tar.set_defaults(func=_layer_tar)


def _inspect(args: argparse.Namespace) -> int:
    from bootc_unified.cstorage import Store

    image = Store.open(args.storage).image(args.image)
    print(json.dumps(image.to_json(), indent=2))
    return 0


def _layer_tar(args: argparse.Namespace) -> int:
    from bootc_unified.cstorage import Store, reassemble

    store = Store.open(args.storage)
    with store.read_lock():
        layer = store.image(args.image).layer(args.diff_id)
        out = sys.stdout.buffer
        reassemble(layer, out)
        out.flush()
    return 0
