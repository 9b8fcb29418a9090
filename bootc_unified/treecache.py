"""Flattened trees of layer chains, kept so that an upgrade flattens only the layers it adds.

An upgrade's new image usually shares all its layers but the top one with the booted image (a
rebuilt top layer) or adds one (a layer appended). Its EROFS build then starts from the tree of
the longest chain of its bottom layers kept here, and applies only the layers above it. Every
image build keeps the tree of its whole chain and of the chain without its top layer.

`<repo>/cache/trees/<sha256 of the chain line>`: a magic line; the chain line (the layer stream
object IDs, bottom to top, space-separated); the SHA-256 of the payload; the payload: zstd of the
`marshal` of the tree in preorder (one tuple per node; a hardlink's second name as the index of
its first). Derived data only, as the layer cache (bootc_unified.layerindex): a missing, torn,
foreign or other-format file is a miss, never an error. Written under a temporary name and renamed
into place without an fsync, by a forked child, so that the build does not wait for it (the child
sees the tree as it was when forked, whatever the build does next). The repository GC removes the
files whose chain names a layer stream it removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import marshal
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zstandard

from bootc_unified import cachefile
from bootc_unified.erofs.tree import Device, Directory, Fifo, InodeMeta, Node, Regular, Socket, Symlink
from bootc_unified.repository import TREE_CACHE
from bootc_unified.repository.gc import TREE_CACHE_MAGIC

_DIGEST = 32
_DIR, _REG, _LNK, _DEV, _FIFO, _SOCK, _SEEN = range(7)


def chain_line(stream_ids: Sequence[str]) -> bytes:
    return " ".join(stream_ids).encode()


def _path(repo_path: Path, stream_ids: Sequence[str]) -> Path:
    return repo_path / TREE_CACHE / hashlib.sha256(chain_line(stream_ids)).hexdigest()


def _leaf_extra(node: Node) -> tuple[int, Any]:
    """A leaf's kind and what it has beyond the common metadata."""
    if type(node) is Regular:
        digest = None if node.object_id is None else bytes.fromhex(node.object_id)
        return _REG, (node.size, node.data, digest)
    if type(node) is Symlink:
        return _LNK, node.target
    if type(node) is Device:
        return _DEV, node.rdev
    if type(node) is Fifo:
        return _FIFO, None
    if type(node) is Socket:
        return _SOCK, None
    raise ValueError(f"not a tree node: {type(node).__name__}")


def encode(root: Directory) -> list[tuple[Any, ...]]:
    """The tree in preorder: (kind, mode, uid, gid, mtime, mtime_nsec, xattrs, extra) per node, a
    directory's extra its number of entries, each entry preceded by (its name,); a leaf met again
    (a hardlink) as (_SEEN, its index among the leaves)."""
    out: list[tuple[Any, ...]] = []
    leaves: dict[int, int] = {}
    stack: list[Node | bytes] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, bytes):  # an entry's name
            out.append((node,))
            continue
        meta = (node.mode, node.uid, node.gid, node.mtime, node.mtime_nsec, node.xattrs)
        if type(node) is Directory:
            out.append((_DIR, *meta, len(node.entries)))
            pending: list[Node | bytes] = []
            for name, child in node.entries.items():
                pending += (name, child)
            pending.reverse()  # popped back in entry order: name, then node
            stack += pending
            continue
        seen = leaves.get(id(node))
        if seen is not None:
            out.append((_SEEN, seen))
            continue
        leaves[id(node)] = len(leaves)
        kind, extra = _leaf_extra(node)
        out.append((kind, *meta, extra))
    return out


def decode(records: list[tuple[Any, ...]]) -> Directory:
    """The tree `encode` gave `records` of (ValueError when they do not make one)."""
    leaves: list[Node] = []
    it = iter(records)
    kind, mode, uid, gid, mtime, nsec, xattrs, count = next(it)
    if kind != _DIR:
        raise ValueError("the root is not a directory")
    root = Directory(mode=mode, uid=uid, gid=gid, mtime=mtime, mtime_nsec=nsec, xattrs=xattrs)
    stack: list[tuple[Directory, int]] = [(root, count)]
    while stack:
        parent, left = stack[-1]
        if not left:
            stack.pop()
            continue
        stack[-1] = (parent, left - 1)
        (name,) = next(it)
        record = next(it)
        kind = record[0]
        node: Node
        if kind == _SEEN:
            node = leaves[record[1]]
        elif kind == _REG:
            _, mode, uid, gid, mtime, nsec, xattrs, (size, data, digest) = record
            node = Regular(
                mode=mode,
                uid=uid,
                gid=gid,
                mtime=mtime,
                mtime_nsec=nsec,
                xattrs=xattrs,
                size=size,
                data=data,
                object_id=None if digest is None else digest.hex(),
            )
            leaves.append(node)
        elif kind == _DIR:
            _, mode, uid, gid, mtime, nsec, xattrs, count = record
            node = Directory(mode=mode, uid=uid, gid=gid, mtime=mtime, mtime_nsec=nsec, xattrs=xattrs)
            stack.append((node, count))
        else:
            node = _special(record)
            leaves.append(node)
        parent.entries[name] = node
    if next(it, None) is not None:
        raise ValueError("records left over after the tree")
    return root


def _special(record: tuple[Any, ...]) -> Node:
    kind, mode, uid, gid, mtime, nsec, xattrs, extra = record
    meta: InodeMeta = {
        "mode": mode,
        "uid": uid,
        "gid": gid,
        "mtime": mtime,
        "mtime_nsec": nsec,
        "xattrs": xattrs,
    }
    if kind == _LNK:
        return Symlink(**meta, target=extra)
    if kind == _DEV:
        return Device(**meta, rdev=extra)
    if kind == _FIFO:
        return Fifo(**meta)
    if kind == _SOCK:
        return Socket(**meta)
    raise ValueError(f"unknown node kind {kind!r}")


def load(repo_path: Path, stream_ids: Sequence[str]) -> Directory | None:
    """The tree of the chain `stream_ids`, or None when no intact file for it exists."""
    try:
        raw = _path(repo_path, stream_ids).read_bytes()
    except OSError:
        return None
    line = chain_line(stream_ids) + b"\n"
    head = len(TREE_CACHE_MAGIC) + len(line)
    if raw[: len(TREE_CACHE_MAGIC)] != TREE_CACHE_MAGIC or raw[len(TREE_CACHE_MAGIC) : head] != line:
        return None
    digest, payload = raw[head : head + _DIGEST], raw[head + _DIGEST :]
    if hashlib.sha256(payload).digest() != digest:
        return None
    try:
        return decode(marshal.loads(zstandard.ZstdDecompressor().decompress(payload)))
    except (ValueError, TypeError, EOFError, StopIteration, IndexError, KeyError, zstandard.ZstdError):
        return None


def longest_prefix(repo_path: Path, stream_ids: Sequence[str]) -> tuple[Directory | None, int]:
    """(the tree, number of layers it covers) of the longest chain of `stream_ids`' bottom layers
    kept here; (None, 0) when none is."""
    for n in range(len(stream_ids), 0, -1):
        tree = load(repo_path, stream_ids[:n])  # a missing file is None too: no stat first
        if tree is not None:
            return tree, n
    return None, 0


def has(repo_path: Path, stream_ids: Sequence[str]) -> bool:
    return _path(repo_path, stream_ids).is_file()


def store(repo_path: Path, stream_ids: Sequence[str], root: Directory) -> None:
    """Keep `root` as the tree of the chain `stream_ids`; a repository that cannot take the file
    (or a tree that cannot be encoded) just has no cache."""
    try:
        payload = zstandard.ZstdCompressor(level=1).compress(marshal.dumps(encode(root), 4))
    except (ValueError, TypeError):
        return
    head = TREE_CACHE_MAGIC + chain_line(stream_ids) + b"\n" + hashlib.sha256(payload).digest()
    cachefile.write(repo_path / TREE_CACHE, _path(repo_path, stream_ids).name, head + payload)


def store_in_child(repo_path: Path, stream_ids: Sequence[str], root: Directory) -> int | None:
    """store() in a forked child, which sees `root` as it is now; returns its pid (wait with
    `reap`), or None when fork failed (nothing is kept then)."""
    try:
        pid = os.fork()
    except OSError:
        return None
    if pid == 0:  # the child: write the file and leave without running any of the parent's cleanup
        status = 1
        try:
            # Hold none of the parent's files open (its repository lock among them): a parent
            # killed now releases its locks at once.
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))
            store(repo_path, stream_ids, root)
            status = 0
        finally:
            os._exit(status)
    return pid


def reap(pids: Sequence[int | None]) -> None:
    for pid in pids:
        if pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
