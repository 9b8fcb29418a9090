"""The `bootc-unified` command line.

Each command group lives in its own module with a `register(subparsers)` function; this module
only assembles them and turns UserError into a one-line message and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bootc_unified.errors import UserError

from . import deploy, image, internals


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bootc-unified", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    internals.register(sub)
    image.register(sub)
    deploy.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int | None = args.func(args)
    except UserError as e:
        print(f"bootc-unified: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except OSError as e:  # a safety net: anything the layers below did not word themselves
        where = f"{e.filename}: " if e.filename else ""
        print(f"bootc-unified: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
