"""The merged tree of an image's layers as bootc's ostree container import makes it.

bootc (ostree-ext `tar/write.rs` and `container/store.rs`) filters each layer's paths, commits each
layer, and checks the layers out on top of each other (union, whiteouts processed), then commits the
result. Emulated here, from the layers' tar-split headers and diff/ files (nothing is extracted):

- paths: `etc/...` -> `usr/etc/...`; `var/...` -> `usr/share/factory/var/...` unless ostree >= 2024.3
  (`retain_var`); the children of `run`, `tmp`, `proc`, `sys` and `dev` are dropped (the directories
  stay), counted per layer like bootc's `ostree.tar-filtered`; other top-level paths are kept (bootc
  allows them for images without an ostree commit, which it treats as composefs-rooted).
- what an ostree repository cannot hold, and `ostree commit` refuses: devices and FIFOs (0/0
  character devices are whiteouts), names and symlink targets that are not UTF-8, and hardlinks to
  those; dropped and counted (`special`).
- a whiteout removes the path from the layers below; an opaque directory (`.wh..wh..opq`) is
  emptied and takes this layer's metadata, as current ostree's checkout does.
- a directory that already exists keeps its metadata when a later layer names it again (a union
  checkout does not touch an existing directory); files and symlinks replace what was there.
- xattrs: empty values are dropped (as podman does), and `trusted.overlay.*` (the overlay driver's
  own) never enters the tree.
- missing parents and an undeclared root get ostree's default directory metadata (0/0, 0755).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bootc_unified.cstorage import Layer, walk_layer
from bootc_unified.cstorage.reassemble import name_parts
from bootc_unified.cstorage.tarheader import HeaderError, TarHeader
from bootc_unified.cstorage.walk import normalize
from bootc_unified.errors import UserError

from .gvariant import regular_checksum_fd, symlink_checksum
from .repo import FileMeta

EXCLUDED_TOPLEVEL = (b"run", b"tmp", b"proc", b"sys", b"dev")
HIDDEN_XATTR_PREFIX = b"trusted.overlay."
DEFAULT_DIR_MODE = stat.S_IFDIR | 0o755


@dataclass
class Dir:
    meta: FileMeta = field(default_factory=lambda: FileMeta(0, 0, DEFAULT_DIR_MODE, {}))
    entries: dict[bytes, Node] = field(default_factory=dict)
    declared: bool = False  # metadata set by a layer entry (else autocreated)


@dataclass(frozen=True)
class File:
    checksum: str
    meta: FileMeta
    size: int
    source: Path | None  # the diff/ file holding the bytes (None when empty)


@dataclass(frozen=True)
class Link:
    checksum: str
    meta: FileMeta
    target: bytes


Node = Dir | File | Link


@dataclass
class MergedTree:
    root: Dir = field(default_factory=Dir)
    filtered: dict[str, dict[str, int]] = field(default_factory=dict)  # layer digest -> name -> count
    special: int = 0  # devices, FIFOs and non-UTF-8 names dropped
    special_first: bytes | None = None  # the first of them (its path in its layer)

    def walk(self) -> Iterator[tuple[bytes, Node]]:
        """(path, node) for every node, parents before children, the root as b""."""
        stack: list[tuple[bytes, Node]] = [(b"", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if isinstance(node, Dir):
                for name in sorted(node.entries, reverse=True):
                    stack.append((path + b"/" + name if path else name, node.entries[name]))


def map_path(parts: list[bytes], retain_var: bool) -> tuple[list[bytes] | None, bytes | None]:
    """(mapped path components, None), or (None, the name counted as filtered)."""
    if not parts:
        return parts, None
    top, rest = parts[0], parts[1:]
    if top == b"etc":
        return [b"usr", b"etc", *rest], None
    if top == b"var" and not retain_var:
        return [b"usr", b"share", b"factory", b"var", *rest], None
    if top in EXCLUDED_TOPLEVEL and rest:
        return None, rest[0]
    return parts, None


def _xattrs(header: TarHeader) -> dict[bytes, bytes]:
    return {
        k.encode(): v
        for k, v in sorted(header.xattrs.items())
        if v and not k.encode().startswith(HIDDEN_XATTR_PREFIX)
    }


class Builder:
    def __init__(self, retain_var: bool) -> None:
        self.tree = MergedTree()
        self.retain_var = retain_var
        self._skipped: set[bytes] = set()  # layer paths dropped as unrepresentable

    def _parent(self, parts: list[bytes]) -> Dir:
        """The directory holding parts[-1], made (with default metadata) where missing, and made a
        directory where a lower layer has a non-directory."""
        node = self.tree.root
        for part in parts[:-1]:
            child = node.entries.get(part)
            if not isinstance(child, Dir):
                child = node.entries[part] = Dir()
            node = child
        return node

    def _lookup(self, parts: list[bytes]) -> Node | None:
        node: Node = self.tree.root
        for part in parts:
            if not isinstance(node, Dir) or part not in node.entries:
                return None
            node = node.entries[part]
        return node

    def apply_layer(self, layer: Layer, blob_digest: str) -> None:
        """Walk the layer (DiffID verified at the end), applying whiteouts and opaque markers
        first, then its entries."""
        label = layer.label
        removals: list[tuple[list[bytes], bool]] = []  # (path, opaque)
        entries: list[tuple[list[bytes], TarHeader, bytes | None]] = []
        filtered: dict[str, int] = {}
        for e in walk_layer(layer):
            parts = [] if e.path == b"." else e.path.split(b"/")
            mapped, dropped = map_path(parts, self.retain_var)
            if mapped is None:
                name = (dropped or b"").decode(errors="replace")
                filtered[name] = filtered.get(name, 0) + 1
                continue
            if not _utf8(e.path) or (e.kind == "symlink" and not _utf8(e.header.linkname)):
                self._drop(e.path)
                continue
            if e.kind == "hardlink" and normalize(e.header.linkname) in self._skipped:
                self._drop(e.path)
                continue
            if e.whiteout or e.opaque:
                removals.append((mapped, e.opaque))
            elif e.kind in ("char", "block", "fifo"):
                self._drop(e.path)
            else:
                entries.append((mapped, e.header, e.content))
        if filtered:
            self.tree.filtered[blob_digest] = filtered
        for parts, opaque in removals:
            if not parts:
                if opaque:
                    self.tree.root.entries.clear()
                continue
            parent = self._parent(parts)
            target = parent.entries.get(parts[-1])
            if opaque:
                # emptied, and (re)made by this layer: its metadata comes from this layer's entry
                parent.entries[parts[-1]] = Dir()
            elif target is not None:
                del parent.entries[parts[-1]]
        seen: set[tuple[bytes, ...]] = set()
        for parts, header, content in entries:
            key = tuple(parts)
            if key in seen:
                raise UserError(f"layer {label}: entry {_show(header)}: duplicate entry for this path")
            seen.add(key)
            try:
                self._add(parts, header, content)
            except (ValueError, HeaderError, OSError) as err:
                why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
                raise UserError(f"layer {label}: entry {_show(header)}: {why}") from None

    def _drop(self, path: bytes) -> None:
        """Count an entry ostree cannot hold (and remember it, for hardlinks to it)."""
        self.tree.special += 1
        if self.tree.special_first is None:
            self.tree.special_first = path
        self._skipped.add(path)

    def _add(self, parts: list[bytes], h: TarHeader, content: bytes | None) -> None:
        kind = h.kind
        xattrs = _xattrs(h)
        if kind == "dir":
            meta = FileMeta(h.uid, h.gid, stat.S_IFDIR | h.mode, xattrs)
            if not parts:
                target: Node | None = self.tree.root
            else:
                parent = self._parent(parts)
                target = parent.entries.get(parts[-1])
                if not isinstance(target, Dir):
                    target = parent.entries[parts[-1]] = Dir()
            assert isinstance(target, Dir)
            if not target.declared:  # an existing directory keeps its metadata (union checkout)
                target.meta, target.declared = meta, True
            return
        if not parts:
            raise ValueError("the root must be a directory")
        node: Node
        if kind == "file":
            meta = FileMeta(h.uid, h.gid, stat.S_IFREG | h.mode, xattrs)
            node = File(_file_checksum(content, meta, h.size), meta, h.size, _path(content, h.size))
        elif kind == "symlink":
            meta = FileMeta(h.uid, h.gid, stat.S_IFLNK | 0o777, xattrs)
            node = Link(symlink_checksum(h.uid, h.gid, h.linkname, xattrs), meta, h.linkname)
        elif kind == "hardlink":
            mapped, _ = map_path(name_parts(h.linkname), self.retain_var)
            found = self._lookup(mapped) if mapped is not None else None
            if not isinstance(found, File | Link):
                raise ValueError(
                    f"hardlink to {h.linkname.decode(errors='replace')!r}, which is no file here"
                )
            node = found
        else:
            raise ValueError(f"unsupported entry type {kind}")
        self._parent(parts).entries[parts[-1]] = node


def _utf8(name: bytes) -> bool:
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _path(content: bytes | None, size: int) -> Path | None:
    return Path(os.fsdecode(content)) if content is not None and size > 0 else None


def _file_checksum(content: bytes | None, meta: FileMeta, size: int) -> str:
    if content is None or size == 0:
        return _empty(meta)
    fd = os.open(content, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != size:
            raise ValueError(f"diff file {os.fsdecode(content)} is not {size} bytes")
        return regular_checksum_fd(fd, meta.uid, meta.gid, meta.mode, meta.xattrs)
    finally:
        os.close(fd)


def _empty(meta: FileMeta) -> str:
    from .gvariant import content_hasher

    return content_hasher(
        meta.uid, meta.gid, stat.S_IFREG | stat.S_IMODE(meta.mode), b"", meta.xattrs
    ).hexdigest()


def _show(header: TarHeader) -> str:
    return repr(header.name.decode("utf-8", "backslashreplace"))


def build(layers: list[tuple[Layer, str]], retain_var: bool) -> MergedTree:
    """The merged tree of (layer, its blob digest) pairs, bottom to top."""
    b = Builder(retain_var)
    for layer, blob in layers:
        b.apply_layer(layer, blob)
    return b.tree
