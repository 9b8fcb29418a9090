"""Errors of the EROFS writer and reader: ValueErrors whose message names the path and the fault."""

from __future__ import annotations


class TreeError(ValueError):
    """The tree given to the writer cannot be represented (bad name, xattr over the limits...)."""


class ImageError(ValueError):
    """An image is not a well-formed composefs EROFS image."""
