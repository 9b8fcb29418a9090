"""`bootc-unified internals cstor --storage ROOT ...`: read an overlay containers-storage directly."""

from __future__ import annotations

from typing import Any


def register(groups: Any) -> None:
    p = groups.add_parser("cstor", help="read an overlay containers-storage (no podman)")
    p.add_argument("--storage", required=True, metavar="ROOT")
    p.add_subparsers(dest="verb", required=True, metavar="VERB")
