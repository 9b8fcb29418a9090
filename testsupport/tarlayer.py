"""Layer splitstreams straight from tar bytes, for tests of what a containers-storage would never
hold (podman refuses such layers at pull time, so the importer cannot be handed them)."""

from __future__ import annotations

import hashlib
import io
import tarfile

from bootc_unified.erofs.tree import INLINE_MAX
from bootc_unified.importer import layer_content_id
from bootc_unified.repository import Repository, splitstream


def diff_id(tar: bytes) -> str:
    return "sha256:" + hashlib.sha256(tar).hexdigest()


def layer_from_tar(repo: Repository, tar: bytes) -> tuple[str, str]:
    """Store `tar` as a layer splitstream the way the importer would; returns (DiffID, stream ID)."""
    writer = splitstream.Writer(repo.alg, splitstream.OCI_LAYER)
    pos = 0
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        for member in tf.getmembers():
            if not member.isreg() or member.size == 0:
                continue
            writer.write_inline(tar[pos : member.offset_data])
            content = tar[member.offset_data : member.offset_data + member.size]
            if member.size > INLINE_MAX:
                writer.write_external(repo.ensure_object(content).object_id, member.size)
            else:
                writer.write_inline(content)
            pos = member.offset_data + member.size
    writer.write_inline(tar[pos:])
    did = diff_id(tar)
    return did, repo.write_stream(layer_content_id(did), writer.finish())


TarEntry = tuple[str, bytes, dict[str, object]]


def entry(name: str, data: bytes = b"x" * 100, **attrs: object) -> TarEntry:
    """A tar member: its name, content (regular files) and tarfile.TarInfo attributes to set."""
    return (name, data, attrs)


def make_tar(*entries: TarEntry) -> bytes:
    """A PAX tar with exactly these members, in this order (fixed mtime)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, attrs in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            for key, value in attrs.items():
                setattr(info, key, value)
            info.size = len(data) if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
            tf.addfile(info, io.BytesIO(data) if info.size else None)
    return buf.getvalue()
