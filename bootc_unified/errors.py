"""The error type every layer raises for a problem the user can act on."""


class UserError(Exception):
    """A one-line, user-facing error: the CLI prints it as is and exits non-zero.

    The message names the thing at fault (a path, an image, a layer), never a traceback.
    """
