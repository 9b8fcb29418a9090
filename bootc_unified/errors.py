"""The error type every layer raises for a problem the user can act on, and the one line of an
external tool's failure worth putting in one."""

from __future__ import annotations

import json
import re


class UserError(Exception):
    """A one-line, user-facing error: the CLI prints it as is and exits non-zero.

    The message names the thing at fault (a path, an image, a layer), never a traceback.
    """


_LOGRUS_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')
_IMAGE_NAME_PREFIX = re.compile(r'^Error parsing image name "[^"]*": ')


def tool_error_line(text: str) -> str:
    """The one line of a podman/skopeo failure worth showing (logrus `msg="..."` unwrapped)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "(no output)"
    last = lines[-1]
    if m := _LOGRUS_MSG.search(last):
        last = json.loads(f'"{m.group(1)}"')
    last = last.removeprefix("Error: ").removeprefix("error: ")
    return _IMAGE_NAME_PREFIX.sub("", last)
