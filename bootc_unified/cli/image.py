"""`bootc-unified image ...`: the bootc-owned containers-storage, driven through podman."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("image", help="images in the bootc-owned containers-storage")
    p.add_subparsers(dest="verb", required=True, metavar="VERB")
