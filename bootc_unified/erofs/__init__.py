"""composefs EROFS images: the tree model, the writer, the reader, and mounting for inspection.

tree = Directory(mode=S_IFDIR | 0o755, entries={b"etc": ..., b"usr": ...})   # from the importer
image = write_image(tree, HashAlg.SHA512)          # bytes; deterministic
read_image(image) == tree                          # the reader checks structure as it walks
referenced_objects(image)                          # object IDs the image needs (GC roots)
with mounted(image_path, repo / "objects", mnt):   # erofs + overlayfs, always unmounted
    ...
"""

from bootc_unified.erofs.errors import ImageError, TreeError
from bootc_unified.erofs.mount import mounted
from bootc_unified.erofs.reader import read_image, referenced_objects
from bootc_unified.erofs.tree import (
    INLINE_MAX,
    Device,
    Directory,
    Fifo,
    Inode,
    InodeMeta,
    Node,
    Regular,
    Socket,
    Symlink,
    from_directory,
    hardlink_groups,
    object_ids,
    walk,
)
from bootc_unified.erofs.writer import write_image

__all__ = [
    "INLINE_MAX",
    "Device",
    "Directory",
    "Fifo",
    "ImageError",
    "Inode",
    "InodeMeta",
    "Node",
    "Regular",
    "Socket",
    "Symlink",
    "TreeError",
    "from_directory",
    "hardlink_groups",
    "mounted",
    "object_ids",
    "read_image",
    "referenced_objects",
    "walk",
    "write_image",
]
