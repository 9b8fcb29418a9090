"""Flatten OCI layers into one filesystem tree, the way overlayfs and podman do.

Input: each layer's splitstream from the repository (tar headers inline, file contents over 64
bytes as object references). Layers apply bottom to top: a layer's whiteouts (`.wh.NAME` entries,
or overlay-style 0/0 character devices) and opaque markers (`.wh..wh..opq`) act on the layers below
it, then its entries are added (two entries for one path in a layer are refused, as containers/storage
refuses them). Owners, modes, times, xattrs, device numbers and link targets come from the tar
headers. Names that climb out of the tree, hardlinks to nothing, and paths through symlinks of the
same layer are rejected with one line naming the layer and the entry.

A layer's entries (whiteouts and opaque markers included) under a path that a lower layer holds as
a symlink or another non-directory get that path as a directory, as in overlayfs: containers/storage
creates the missing parents in the layer's diff/ (mode 0755), and the upper directory hides the
lower non-directory. So does a whiteout or opaque marker in a directory no layer has.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator, Sequence

from bootc_unified import treecache
from bootc_unified.cstorage.reassemble import name_parts
from bootc_unified.cstorage.tarheader import CHARDEV, HeaderError, kind_of
from bootc_unified.cstorage.walk import OPAQUE_MARKER, WHITEOUT_PREFIX
from bootc_unified.erofs import format as erofs_format
from bootc_unified.erofs.tree import Device, Directory, Fifo, InodeMeta, Node, Regular, Symlink
from bootc_unified.errors import UserError
from bootc_unified.layerindex import Member, layer_members
from bootc_unified.repository import Repository, splitstream

DEFAULT_DIR_MODE = stat.S_IFDIR | 0o755


class LayerError(UserError):
    """A layer whose content cannot be applied; the message names the layer and the entry."""


class Flattener:
    def __init__(self, root: Directory | None = None) -> None:
        self.root = Directory(mode=DEFAULT_DIR_MODE) if root is None else root
        self._layer_paths: set[bytes] = set()  # paths the layer being applied has created
        # Directories already reached by path (b"a/b"), so that a layer's entries, which come
        # grouped by directory, do not walk from the root each; emptied whenever a directory
        # leaves the tree (whiteout, opaque marker, a non-directory put in its place).
        self._dirs: dict[bytes, Directory] = {}

    def _error(self, label: str, member: Member, why: str) -> LayerError:
        shown = member.name.decode("utf-8", "backslashreplace")
        return LayerError(f"layer {label}: entry {shown!r}: {why}")

    def _parent(self, parts: list[bytes], create: bool) -> Directory | None:
        """The directory holding `parts[-1]`. With `create`, missing parents and parents that a lower
        layer holds as non-directories become directories of this layer (overlayfs shows the upper
        directory); a non-directory of this same layer in the way is an error."""
        if len(parts) < 2:
            return self.root
        key = b"/".join(parts[:-1])
        node = self._dirs.get(key)
        if node is not None:
            return node
        node = self.root
        for i, part in enumerate(parts[:-1]):
            child = node.entries.get(part)
            if isinstance(child, Directory):  # the common case: no path to build
                node = child
                continue
            path = b"/".join(parts[: i + 1])
            if create and path not in self._layer_paths:
                child = node.entries[part] = Directory(mode=DEFAULT_DIR_MODE)
                self._layer_paths.add(path)
            if child is None:
                return None
            if isinstance(child, Symlink):
                raise ValueError(f"parent {path.decode(errors='replace')} is a symlink")
            if not isinstance(child, Directory):
                if not create:
                    return None
                raise ValueError(f"parent {path.decode(errors='replace')} is not a directory")
            node = child
        self._dirs[key] = node
        return node

    def _lookup(self, parts: list[bytes]) -> Node | None:
        if not parts:
            return self.root
        parent = self._parent(parts, create=False)
        return None if parent is None else parent.entries.get(parts[-1])

    def apply(self, members: Iterable[Member], label: str) -> None:
        entries: list[tuple[Member, list[bytes]]] = []
        self._layer_paths = set()
        self._dirs = {}
        for m in members:  # whiteouts and opaque markers act on the layers below
            try:
                parts = name_parts(m.name)
                base = parts[-1] if parts else b""
                if base.startswith(WHITEOUT_PREFIX):  # the opaque marker starts with it too
                    if base == OPAQUE_MARKER:
                        self._opaque(parts[:-1])
                    else:
                        self._remove([*parts[:-1], base[len(WHITEOUT_PREFIX) :]])
                elif m.devmajor == 0 and m.devminor == 0 and m.typeflag == CHARDEV:
                    self._remove(parts)
                else:
                    entries.append((m, parts))
            except ValueError as e:
                raise self._error(label, m, str(e)) from None
        seen: set[bytes] = set()
        layer_paths = self._layer_paths
        for m, parts in entries:
            key = b"/".join(parts)
            if key in seen:  # as containers/storage: "duplicates of file paths not supported"
                raise self._error(label, m, "duplicate entry for this path in the same layer")
            seen.add(key)
            try:
                self._add(m, parts)
            except (ValueError, HeaderError) as e:
                raise self._error(label, m, str(e)) from None
            layer_paths.add(key)

    def _remove(self, parts: list[bytes]) -> None:
        """A whiteout: its directory exists in this layer (containers/storage makes it), the name goes."""
        if not parts:
            raise ValueError("a whiteout of the root")
        parent = self._parent(parts, create=True)
        assert parent is not None
        if isinstance(parent.entries.pop(parts[-1], None), Directory):
            self._dirs.clear()

    def _opaque(self, parts: list[bytes]) -> None:
        """An opaque marker: its directory exists in this layer, nothing below shows through."""
        if not parts:
            self._dirs.clear()
            self.root.entries.clear()
            return
        parent = self._parent(parts, create=True)
        assert parent is not None
        target = parent.entries.get(parts[-1])
        if isinstance(target, Directory):
            target.entries.clear()
            self._dirs.clear()
        elif b"/".join(parts) not in self._layer_paths:
            parent.entries[parts[-1]] = Directory(mode=DEFAULT_DIR_MODE)
        self._layer_paths.add(b"/".join(parts))

    def _add(self, m: Member, parts: list[bytes]) -> None:
        kind = kind_of(m.typeflag)
        xattrs = _xattrs(m.xattrs) if m.xattrs else {}
        if not parts:
            if kind != "dir":
                raise ValueError("the root must be a directory")
            self._set_dir_meta(self.root, stat.S_IFDIR | m.mode, m, xattrs)
            return
        parent = self._parent(parts, create=True)
        assert parent is not None
        name = parts[-1]
        existing = parent.entries.get(name)
        node: Node
        # The nodes are built with keywords spelled out: this runs once per entry of every layer.
        if kind == "file":
            size = m.size
            node = Regular(
                mode=stat.S_IFREG | m.mode,
                uid=m.uid,
                gid=m.gid,
                mtime=m.mtime,
                mtime_nsec=m.mtime_nsec,
                xattrs=xattrs,
                size=size,
                data=m.data if size else b"",
                object_id=m.object_id,
            )
        elif kind == "dir":
            if isinstance(existing, Directory):
                self._set_dir_meta(existing, stat.S_IFDIR | m.mode, m, xattrs)
                return
            node = Directory(
                mode=stat.S_IFDIR | m.mode,
                uid=m.uid,
                gid=m.gid,
                mtime=m.mtime,
                mtime_nsec=m.mtime_nsec,
                xattrs=xattrs,
            )
        elif kind == "hardlink":
            target_parts = name_parts(m.linkname)
            target = self._lookup(target_parts)
            if target is None:
                raise ValueError(
                    f"hardlink to {m.linkname.decode(errors='replace')!r}, which does not exist (yet)"
                )
            if isinstance(target, Directory):
                raise ValueError("hardlink to a directory")
            node = target
        elif kind == "symlink":
            node = Symlink(  # symlinks have no mode of their own on Linux
                mode=stat.S_IFLNK | 0o777,
                uid=m.uid,
                gid=m.gid,
                mtime=m.mtime,
                mtime_nsec=m.mtime_nsec,
                xattrs=xattrs,
                target=m.linkname,
            )
        else:
            node = _special(kind, m, xattrs)
        if isinstance(existing, Directory):  # a non-directory takes a directory's place
            self._dirs.clear()
        parent.entries[name] = node

    @staticmethod
    def _set_dir_meta(d: Directory, mode: int, m: Member, xattrs: dict[bytes, bytes]) -> None:
        d.mode, d.uid, d.gid = mode, m.uid, m.gid
        d.mtime, d.mtime_nsec, d.xattrs = m.mtime, m.mtime_nsec, xattrs


def _special(kind: str, m: Member, xattrs: dict[bytes, bytes]) -> Node:
    """A device or FIFO node."""
    meta: InodeMeta = {
        "mode": m.mode,
        "uid": m.uid,
        "gid": m.gid,
        "mtime": m.mtime,
        "mtime_nsec": m.mtime_nsec,
        "xattrs": xattrs,
    }
    if kind in ("char", "block"):
        meta["mode"] |= stat.S_IFCHR if kind == "char" else stat.S_IFBLK
        return Device(**meta, rdev=os.makedev(m.devmajor, m.devminor))
    if kind == "fifo":
        meta["mode"] |= stat.S_IFIFO
        return Fifo(**meta)
    raise ValueError(f"unsupported entry type {kind}")


def _xattrs(pax: dict[str, bytes]) -> dict[bytes, bytes]:
    """A tar member's xattrs as the tree keeps them, checked against EROFS's limits. Go's
    archive/tar (and so podman) drops xattrs whose value is empty; so do we."""
    xattrs = {k.encode(): v for k, v in sorted(pax.items()) if v}
    for xname, value in xattrs.items():
        if len(xname) > erofs_format.XATTR_NAME_MAX or len(value) > erofs_format.XATTR_VALUE_MAX:
            raise ValueError(
                f"xattr {xname.decode(errors='replace')!r} ({len(xname)}-byte name, {len(value)}-byte "
                f"value) exceeds EROFS's limits ({erofs_format.XATTR_NAME_MAX}, "
                f"{erofs_format.XATTR_VALUE_MAX})"
            )
    return xattrs


def _apply_layer(flattener: Flattener, repo: Repository, diff_id: str, stream_id: str) -> None:
    try:
        members = layer_members(repo, diff_id, stream_id)
    except (HeaderError, splitstream.SplitStreamError) as e:
        raise LayerError(f"layer {diff_id}: {e}") from e
    flattener.apply(members, diff_id)


def flatten(repo: Repository, layers: Sequence[tuple[str, str]]) -> Directory:
    """The merged tree of `layers`, (DiffID, layer stream object ID) pairs from bottom to top."""
    flattener = Flattener()
    for diff_id, stream_id in layers:
        _apply_layer(flattener, repo, diff_id, stream_id)
    return flattener.root


@contextlib.contextmanager
def flattened(repo: Repository, layers: Sequence[tuple[str, str]]) -> Iterator[Directory]:
    """flatten(), starting from the tree of the longest chain of bottom layers the tree cache
    keeps (bootc_unified.treecache); the trees of the whole chain and of the chain without its
    top layer are kept for the next build by forked children, waited for when the block ends."""
    stream_ids = [stream_id for _, stream_id in layers]
    root, start = treecache.longest_prefix(repo.path, stream_ids)
    flattener = Flattener(root)
    children: list[int | None] = []
    try:
        for i in range(start, len(layers)):
            if i == len(layers) - 1 and i > 0 and not treecache.has(repo.path, stream_ids[:i]):
                children.append(treecache.store_in_child(repo.path, stream_ids[:i], flattener.root))
            _apply_layer(flattener, repo, *layers[i])
        if start < len(layers):
            children.append(treecache.store_in_child(repo.path, stream_ids, flattener.root))
        yield flattener.root
    finally:
        treecache.reap(children)
