"""composefs EROFS images: the tree model, the writer, the reader, and mounting for inspection."""

from bootc_unified.erofs.errors import ImageError, TreeError
from bootc_unified.erofs.tree import (
    INLINE_MAX,
    Device,
    Directory,
    Fifo,
    Inode,
    Node,
    Regular,
    Socket,
    Symlink,
    from_directory,
)
from bootc_unified.erofs.writer import write_image

__all__ = [
    "INLINE_MAX",
    "Device",
    "Directory",
    "Fifo",
    "ImageError",
    "Inode",
    "Node",
    "Regular",
    "Socket",
    "Symlink",
    "TreeError",
    "from_directory",
    "write_image",
]
