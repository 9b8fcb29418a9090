"""Garbage collection: keep what the refs reach, remove the rest.

Under the repository's exclusive lock: the roots are every link under streams/refs and images/refs.
From a stream the walk reaches its external objects and the streams its named refs name (the
`composefs.image` named ref of a config stream names an EROFS image); from an image, every object
its files redirect to. Links whose target goes (streams/<id>, images/<id>, refs) and temporary
links left by a crash are removed first, then the unreached objects: a crash in between leaves
only unreferenced objects, which the next GC removes. Last, the layer cache's files of streams no
longer kept (derived data, see bootc_unified.layerindex). A root that cannot be read (a damaged
stream or image) stops the GC before anything is removed: its objects are not known.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bootc_unified import faults
from bootc_unified.errors import UserError
from bootc_unified.repository import splitstream
from bootc_unified.repository.refs import TMP_PREFIX, links_under, object_id_of

IMAGE_NAMED_REF = "composefs.image"
LAYER_CACHE = "cache/layers"  # parsed tar members per layer stream (bootc_unified.layerindex)
TREE_CACHE = "cache/trees"  # flattened trees per chain of layer streams (bootc_unified.treecache)
# A tree file starts with this line, then its chain: the layer stream IDs, space-separated.
TREE_CACHE_MAGIC = b"bootc-unified tree 1\n"

ImageObjects = Callable[[bytes], set[str]]


@dataclass
class GcResult:
    kept_objects: int = 0
    removed_objects: list[str] = field(default_factory=list)
    removed_bytes: int = 0
    removed_links: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "kept_objects": self.kept_objects,
            "removed_objects": len(self.removed_objects),
            "removed_bytes": self.removed_bytes,
            "removed_links": self.removed_links,
            "objects": self.removed_objects,
        }


class Walker:
    """Collects every object reachable from the roots."""

    def __init__(self, read: Callable[[str], bytes], image_objects: ImageObjects) -> None:
        self.read = read
        self.image_objects = image_objects
        self.reached: set[str] = set()

    def stream(self, object_id: str) -> None:
        if object_id in self.reached:
            return
        self.reached.add(object_id)
        try:
            parsed = splitstream.parse(self.read(object_id))
        except splitstream.SplitStreamError as e:  # a root unreadable: remove nothing
            raise UserError(f"GC: stream object {object_id} is damaged ({e}); nothing removed") from e
        self.reached.update(parsed.object_refs)
        for name, target in parsed.named_refs.items():
            if name == IMAGE_NAMED_REF:
                self.image(target)
            else:
                self.stream(target)

    def image(self, object_id: str) -> None:
        if object_id in self.reached:
            return
        self.reached.add(object_id)
        try:
            self.reached.update(self.image_objects(self.read(object_id)))
        except ValueError as e:  # erofs ImageError: a root unreadable, remove nothing
            raise UserError(f"GC: EROFS image {object_id} is damaged ({e}); nothing removed") from e


def collect(
    repo_path: Path,
    objects_dir: Path,
    walker: Walker,
    dry_run: bool,
    extra_images: Iterable[str] = (),
    ignore_ref: Callable[[str], bool] | None = None,
) -> GcResult:
    """The GC proper; the caller holds the exclusive lock.

    `extra_images`: EROFS image ids kept as roots besides the refs (bootc's `additional_roots`);
    `ignore_ref(rel)`: refs (paths relative to the repository) not counted as roots.
    """
    result = GcResult()
    for link in links_under(repo_path / "streams" / "refs"):
        if ignore_ref is not None and ignore_ref(str(link.relative_to(repo_path))):
            continue
        if (target := object_id_of(link, objects_dir)) is not None:
            walker.stream(target)
    for link in links_under(repo_path / "images" / "refs"):
        if ignore_ref is not None and ignore_ref(str(link.relative_to(repo_path))):
            continue
        if (target := object_id_of(link, objects_dir)) is not None:
            walker.image(target)
    for image_id in extra_images:
        if object_id_of(repo_path / "images" / image_id, objects_dir) == image_id:
            walker.image(image_id)

    for prefix in sorted(os.listdir(objects_dir)):
        pdir = objects_dir / prefix
        if not pdir.is_dir() or len(prefix) != 2:
            continue
        for rest in sorted(os.listdir(pdir)):
            object_id = prefix + rest
            if object_id in walker.reached:
                result.kept_objects += 1
                continue
            result.removed_objects.append(object_id)
            result.removed_bytes += (pdir / rest).lstat().st_size

    gone = set(result.removed_objects)
    for top in ("streams", "images"):
        for link in links_under(repo_path / top, with_tmp=True):
            target = object_id_of(link, objects_dir)
            if link.name.startswith(TMP_PREFIX) or target is None or target in gone:
                result.removed_links.append(str(link.relative_to(repo_path)))
    if not dry_run:
        # Links first: a crash in between leaves unreferenced objects (the next GC takes them),
        # never a link to an object that is gone.
        for rel in result.removed_links:
            faults.point("repo-gc-link")
            (repo_path / rel).unlink(missing_ok=True)
        for object_id in result.removed_objects:
            faults.point("repo-gc-object")
            (objects_dir / object_id[:2] / object_id[2:]).unlink(missing_ok=True)
        prune_layer_cache(repo_path / LAYER_CACHE, walker.reached)
        prune_tree_cache(repo_path / TREE_CACHE, walker.reached)
    return result


def prune_tree_cache(directory: Path, live: set[str]) -> None:
    """Remove the trees whose chain names a stream not in `live`, files of another format, and
    temporary files a crash left (no build writes one while GC holds the writer lock)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        chain = tree_chain(directory / name)
        if chain is None or not all(stream_id in live for stream_id in chain):
            (directory / name).unlink(missing_ok=True)


def tree_chain(path: Path) -> list[str] | None:
    """The chain of layer streams a tree cache file is for (from its head); None for a file of
    another format."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(TREE_CACHE_MAGIC))
            line = f.readline(1 << 20)
    except OSError:
        return None
    if head != TREE_CACHE_MAGIC or not line.endswith(b"\n"):
        return None
    return line[:-1].decode("ascii", "replace").split(" ")


def prune_layer_cache(directory: Path, keep: set[str]) -> None:
    """Remove the cache files of streams not in `keep`, and temporary files a crash left."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        if name not in keep:
            (directory / name).unlink(missing_ok=True)
