"""Logically bound images (LBIs): the app images an OS image names in `/usr/lib/bootc/bound-images.d/`
(bootc `crates/lib/src/boundimage.rs`, reference/deployments.md section 10).

    usr/lib/bootc/bound-images.d/app.image      -> /usr/share/containers/systemd/app.image
    usr/lib/bootc/bound-images.d/web.container  -> ../../../share/containers/systemd/web.container

Each entry must be a symlink; its target is resolved inside the image root (absolute targets and
`..` stay inside it). `.image` files are read as `[Image] Image=`, `.container` files as
`[Container] Image=` (systemd unit syntax: `#`/`;` comments, `\\` continuation, the last `Image=`
wins). `AuthFile=` is refused, and so is every systemd `%` specifier except `%%` (-> `%`). Every
error is one line naming the file.

The image root is a directory (`DirRoot`: a mounted EROFS image, an unpacked tree) or the tree of
a composefs EROFS image read without mounting it (`TreeRoot`, file data from the repository).

Unlike bootc's composefs backend, which never pulls LBIs, `pull_bound_images` pulls the missing
ones into the bootc store; the caller stages a deployment only after it succeeded.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from bootc_unified.erofs.tree import Directory, Node, Regular, Symlink
from bootc_unified.errors import UserError
from bootc_unified.imgstore import ImageStore, PullPolicy, StoreImage, check_qualified
from bootc_unified.progress import Progress

BOUND_DIR = PurePosixPath("usr/lib/bootc/bound-images.d")
SECTIONS = {".image": "Image", ".container": "Container"}
MAX_SYMLINKS = 40  # as the kernel's path walk


@dataclass(frozen=True)
class BoundImage:
    image: str  # the `Image=` value, specifiers expanded
    file: str  # the entry's path in the image, e.g. /usr/lib/bootc/bound-images.d/app.image

    @property
    def name(self) -> str:
        """The reference as podman names it: a tag (`:latest`) is added when there is none."""
        return normalize(self.image)


def normalize(ref: str) -> str:
    """podman's stored name for `ref`: `docker://` dropped, `:latest` added when untagged."""
    ref = ref.removeprefix("docker://")
    if "@" in ref:
        return ref
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last else f"{ref}:latest"


# --- image roots -------------------------------------------------------------------------------------


class ImageRoot(Protocol):
    """Read access to an image's tree, paths relative to its root, no symlink following."""

    def kind(self, path: PurePosixPath) -> str | None:  # "dir", "link", "file", "other", None
        ...

    def listdir(self, path: PurePosixPath) -> list[str]: ...

    def readlink(self, path: PurePosixPath) -> str: ...

    def read(self, path: PurePosixPath) -> bytes: ...


@dataclass(frozen=True)
class DirRoot:
    """An image root that is a directory on disk (e.g. a mounted EROFS image)."""

    root: Path

    def _p(self, path: PurePosixPath) -> Path:
        return self.root / path

    def kind(self, path: PurePosixPath) -> str | None:
        try:
            mode = os.lstat(self._p(path)).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISDIR(mode):
            return "dir"
        if stat.S_ISLNK(mode):
            return "link"
        return "file" if stat.S_ISREG(mode) else "other"

    def listdir(self, path: PurePosixPath) -> list[str]:
        return sorted(os.listdir(self._p(path)))

    def readlink(self, path: PurePosixPath) -> str:
        return os.readlink(self._p(path))

    def read(self, path: PurePosixPath) -> bytes:
        return self._p(path).read_bytes()


@dataclass(frozen=True)
class TreeRoot:
    """An image root read from a composefs EROFS tree; large files' data from `read_object`."""

    tree: Directory
    read_object: Callable[[str], bytes]

    def _node(self, path: PurePosixPath) -> Node | None:
        node: Node = self.tree
        for part in path.parts:
            if not isinstance(node, Directory):
                return None
            child = node.entries.get(os.fsencode(part))
            if child is None:
                return None
            node = child
        return node

    def kind(self, path: PurePosixPath) -> str | None:
        node = self._node(path)
        if node is None:
            return None
        if isinstance(node, Directory):
            return "dir"
        if isinstance(node, Symlink):
            return "link"
        return "file" if isinstance(node, Regular) else "other"

    def listdir(self, path: PurePosixPath) -> list[str]:
        node = self._node(path)
        assert isinstance(node, Directory)
        return sorted(os.fsdecode(name) for name in node.entries)

    def readlink(self, path: PurePosixPath) -> str:
        node = self._node(path)
        assert isinstance(node, Symlink)
        return os.fsdecode(node.target)

    def read(self, path: PurePosixPath) -> bytes:
        node = self._node(path)
        assert isinstance(node, Regular)
        if node.data is not None:
            return node.data
        assert node.object_id is not None
        return self.read_object(node.object_id)


def resolve(root: ImageRoot, path: PurePosixPath, where: str) -> PurePosixPath:
    """`path` with every symlink followed inside the image root (`/` and `..` stop at the root)."""
    todo = list(path.parts)
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("/", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        current = PurePosixPath(*done, part)
        if root.kind(current) != "link":
            done.append(part)
            continue
        hops += 1
        if hops > MAX_SYMLINKS:
            raise UserError(f"{where}: too many levels of symbolic links")
        target = root.readlink(current)
        if target.startswith("/"):
            done = []
        todo = list(PurePosixPath(target).parts) + todo
    return PurePosixPath(*done) if done else PurePosixPath(".")


# --- the unit files ------------------------------------------------------------------------------------


def expand_specifiers(value: str, where: str) -> str:
    """`%%` -> `%`; any other systemd specifier is refused."""
    out = []
    i = 0
    while i < len(value):
        if value[i] == "%":
            nxt = value[i + 1 : i + 2]
            if nxt != "%":
                raise UserError(f"{where}: systemd specifier %{nxt} is not supported in Image=")
            out.append("%")
            i += 2
            continue
        out.append(value[i])
        i += 1
    return "".join(out)


def parse_unit(text: str, section: str, where: str) -> str:
    """The `Image=` of `[section]` in a quadlet unit file."""
    values: dict[str, str] = {}
    current: str | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        while line.endswith("\\") and i < len(lines):  # systemd continuation: joined with a space
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise UserError(f"{where}: bad section header {line!r}")
            current = line[1:-1].strip()
            continue
        key, eq, value = line.partition("=")
        if not eq:
            raise UserError(f"{where}: expected KEY=VALUE, got {line!r}")
        if current == section:
            values[key.strip()] = value.strip()
    if section == "Image" and "AuthFile" in values:
        raise UserError(f"{where}: AuthFile= is not supported for bound images")
    image = values.get("Image")
    if not image:
        raise UserError(f"{where}: no Image= in [{section}]")
    image = expand_specifiers(image, where)
    try:
        check_qualified(image)
    except UserError as e:
        raise UserError(f"{where}: Image={image}: {str(e).partition(': ')[2]}") from None
    return image


def bound_images(root: ImageRoot) -> list[BoundImage]:
    """The image's bound images, in file-name order (none when it has no bound-images.d)."""
    base = resolve(root, BOUND_DIR, f"/{BOUND_DIR}")
    if root.kind(base) != "dir":
        return []
    out = []
    for name in root.listdir(base):
        where = f"/{BOUND_DIR}/{name}"
        path = base / name
        suffix = PurePosixPath(name).suffix
        if suffix not in SECTIONS:
            raise UserError(f"{where}: not a .image or .container file")
        if root.kind(path) != "link":
            raise UserError(f"{where}: not a symlink (bound images are symlinks to quadlet files)")
        target = resolve(root, path, where)
        if root.kind(target) != "file":
            raise UserError(f"{where}: symlink target /{target} is not a file in the image")
        try:
            text = root.read(target).decode()
        except UnicodeDecodeError:
            raise UserError(f"{where}: /{target} is not UTF-8") from None
        out.append(BoundImage(parse_unit(text, SECTIONS[suffix], where), where))
    return out


def bound_images_of_dir(path: Path) -> list[BoundImage]:
    return bound_images(DirRoot(path))


def bound_images_of_erofs(image: bytes, read_object: Callable[[str], bytes]) -> list[BoundImage]:
    """The bound images of a composefs EROFS image (no mount)."""
    from bootc_unified.erofs.reader import read_image

    return bound_images(TreeRoot(read_image(image), read_object))


# --- pulling ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PulledImage:
    bound: BoundImage
    image: StoreImage
    pulled: bool  # False: it was in the store already


def pull_bound_images(
    store: ImageStore,
    images: Sequence[BoundImage] | Iterable[BoundImage],
    tls_verify: bool = True,
    progress: Progress | None = None,
) -> list[PulledImage]:
    """Pull the bound images missing from the store (`podman image exists` first).

    A failure raises a one-line error naming the image and its file; images pulled before it stay
    (they are not staged yet, and the next GC drops them unless a live deployment binds them).
    """
    out = []
    for bound in images:
        if store.exists(bound.name):
            out.append(PulledImage(bound, store.inspect(bound.name), False))
            continue
        try:
            image = store.pull(bound.name, PullPolicy.MISSING, tls_verify, progress)
        except UserError as e:
            raise UserError(f"bound image {bound.image} ({bound.file}): {e}") from None
        out.append(PulledImage(bound, image, True))
    return out
