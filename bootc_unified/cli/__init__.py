"""The `bootc-unified` command line.

Each command group lives in its own module with a `register(subparsers)` function; this module
only assembles them and turns UserError into a one-line message and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bootc_unified import mountns
from bootc_unified.errors import UserError

from . import deploy, image, internals


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bootc-unified", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    internals.register(sub)
    image.register(sub)
    deploy.register(sub)
    return parser


def main(argv: Sequence[str] | None = None, *, own_process: bool = False) -> int:
    """Run one command. `own_process`: this is the whole process (the installed command, `python
    -m bootc_unified`), so a command that mounts runs in a private mount namespace (mountns.py)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if own_process and getattr(args, "private_mounts", True):
            mountns.ensure_private()
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


def run() -> int:
    """The `bootc-unified` command's entry point."""
    return main(own_process=True)


if __name__ == "__main__":
    sys.exit(run())
