"""The composefs repository (as composefs-rs lays it out): objects, locks, fsck.

meta.json                 version, algorithm, features
objects/XX/<rest>         content-addressed by fs-verity digest
streams/, streams/refs/   splitstreams and their GC roots
images/, images/refs/     EROFS images and their names
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from bootc_unified import verity
from bootc_unified.digestpool import FileDigest
from bootc_unified.errors import UserError
from bootc_unified.libc import libc as load_libc
from bootc_unified.repository import lock, splitstream
from bootc_unified.repository.fsck import FsckReport, check_links, check_objects
from bootc_unified.repository.gc import LAYER_CACHE, TREE_CACHE, GcResult, Walker, collect
from bootc_unified.repository.meta import Meta
from bootc_unified.repository.objects import Method, ObjectResult, ObjectStore
from bootc_unified.repository.refs import (
    escape_ref,
    links_under,
    object_id_of,
    relative_target,
    replace_symlink,
)
from bootc_unified.verity import HashAlg

__all__ = ["LAYER_CACHE", "TREE_CACHE", "Method", "ObjectResult", "RecoverReport", "Repository", "escape_ref"]

SUBDIRS = ("objects", "streams", "streams/refs", "images", "images/refs")


TRANSACTIONS = "transactions"  # markers of writes in progress (Repository.transaction)


@dataclass
class RecoverReport:
    markers: int  # interrupted writes found
    checked: int = 0  # objects changed since the oldest one began, re-digested
    removed: list[str] = field(default_factory=list)  # damaged objects removed
    unnamed: list[str] = field(default_factory=list)  # streams/<id>, images/<id> names they took along

    def line(self, repo: Path) -> str:
        return (
            f"{repo}: recovered from {self.markers} interrupted write(s): {self.checked} objects checked, "
            f"{len(self.removed)} damaged removed, {len(self.unnamed)} names dropped"
        )


def interrupted(repo: Path) -> bool:
    """Whether a write's marker is left in `repo`'s transactions/ (a writer still running, or one
    a crash or power cut interrupted): a directory read, nothing opened."""
    try:
        with os.scandir(repo / TRANSACTIONS) as it:
            return any(True for _ in it)
    except FileNotFoundError:
        return False


def fsync_dir(path: Path) -> None:
    """fsync(2) of a directory: the names created, renamed or removed in it are on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(fd: int) -> None:
    """syncfs(2) of the filesystem holding `fd` (os.sync() where libc has none)."""
    libc = load_libc()
    if not hasattr(libc, "syncfs"):
        os.sync()
        return
    if libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def sync_filesystem(path: Path) -> None:
    """syncfs(2) of the filesystem holding the directory `path`: its dirty inodes and blocks."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        syncfs(fd)
    finally:
        os.close(fd)


class Repository:
    def __init__(self, path: Path, meta: Meta) -> None:
        self.path = path
        self.meta = meta
        self.objects = ObjectStore(path, meta.alg, meta.insecure)

    @property
    def insecure(self) -> bool:
        return self.meta.insecure

    @property
    def alg(self) -> HashAlg:
        return self.meta.alg

    @classmethod
    def init(cls, path: Path, alg: HashAlg = HashAlg.SHA512, insecure: bool = False) -> Repository:
        """Create a repository atomically: build it in a sibling temporary directory, then rename.

        Without `insecure`, fs-verity must be available where the repository lives.
        """
        path = Path(os.path.abspath(path))
        if (path / "meta.json").exists():
            raise UserError(f"{path}: already a composefs repository")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"{path}: exists and is not an empty directory")
        if not path.parent.is_dir():
            raise UserError(f"{path.parent}: no such directory")
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.init-", dir=path.parent))
        try:
            if not insecure:
                support = verity.probe(tmp)
                if not support.supported:
                    raise UserError(f"{path}: {support.reason}; use --insecure to create it without")
            for sub in SUBDIRS:
                (tmp / sub).mkdir()
            os.chmod(tmp, 0o755)
            # Hardlinked objects keep their source's mode (setuid bits included): only root may
            # reach them; overlayfs looks them up with the mounter's credentials.
            os.chmod(tmp / "objects", 0o700)
            meta = Meta(alg=alg, insecure=insecure)
            meta.write(tmp)
            os.rename(tmp, path)  # replaces an empty directory atomically
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path, meta)

    @classmethod
    def open(cls, path: Path) -> Repository:
        path = Path(os.path.abspath(path))
        if not path.is_dir():
            raise UserError(f"{path}: no such repository directory")
        meta = Meta.read(path)
        missing = [sub for sub in SUBDIRS if not (path / sub).is_dir()]
        if missing:
            raise UserError(f"{path}: damaged repository, missing {', '.join(missing)}")
        return cls(path, meta)

    def writer_lock(self) -> AbstractContextManager[None]:
        """Shared: any number of writers of objects/streams/refs; excludes GC."""
        return lock.shared(self.path)

    def gc_lock(self) -> AbstractContextManager[None]:
        """Exclusive: nothing else touches the repository meanwhile."""
        return lock.exclusive(self.path)

    def ensure_object(self, data: bytes) -> ObjectResult:
        return self.objects.ensure_object(data)

    def ensure_object_from_file(
        self, path: Path | bytes, zerocopy: bool = False, digest: FileDigest | None = None
    ) -> ObjectResult:
        return self.objects.ensure_object_from_file(path, zerocopy_only=zerocopy, digest=digest)

    # --- streams, images and their refs ----------------------------------------------------------

    def read_object(self, object_id: str) -> bytes:
        try:
            return self.objects.path_of(object_id).read_bytes()
        except FileNotFoundError:
            raise UserError(f"{self.path}: object {object_id} is missing") from None

    def stream_link(self, content_id: str) -> Path:
        if "/" in content_id or content_id.startswith("."):
            raise UserError(f"bad stream name {content_id!r}")
        return self.path / "streams" / content_id

    def has_stream(self, content_id: str) -> str | None:
        """The object ID of the stream named `content_id`, if it is present and intact."""
        return object_id_of(self.stream_link(content_id), self.objects.dir)

    def sync(self) -> None:
        """Make everything written so far durable (syncfs of the repository's filesystem).

        Called before a name that later runs trust: `streams/<id>` (an import skips a layer whose
        stream is named) and `images/<id>`. Objects are linked into place without an fsync each;
        a power cut before this barrier can leave named objects whose data is lost (btrfs: the
        name and fs-verity descriptor kept, the size 0), which nothing names yet and which the
        next import replaces (ObjectStore.present)."""
        sync_filesystem(self.path)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A write of objects in progress: `transactions/<pid>-<token>`, created and synced before
        the body runs, removed after the body's writes are synced. A marker left behind means a
        writer died or the power went while it wrote (see recover())."""
        markers = self.path / TRANSACTIONS
        markers.mkdir(mode=0o700, exist_ok=True)
        marker = markers / f"{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(markers)
        try:
            yield
        finally:
            self.sync()
            marker.unlink(missing_ok=True)

    def recover(self) -> RecoverReport | None:
        """After an interrupted write (a marker in `transactions/`): every object changed since
        the oldest marker is re-digested, and one whose content is not its name (what a power
        cut leaves: data lost under a kept name) is removed, with the `streams/<id>` and
        `images/<id>` names left pointing nowhere; then the markers go. Exclusive: no writer
        runs meanwhile. None when there was nothing to recover."""
        markers = self.path / TRANSACTIONS
        if not interrupted(self.path):
            return None
        with self.gc_lock():
            found = [m for m in markers.iterdir()]
            if not found:
                return None
            since = min(m.lstat().st_mtime for m in found) - 2.0  # coarse timestamps
            report = RecoverReport(markers=len(found))
            for prefix in os.scandir(self.objects.dir):
                if not prefix.is_dir(follow_symlinks=False):
                    continue
                for entry in os.scandir(prefix.path):
                    st = entry.stat(follow_symlinks=False)
                    if not entry.is_file(follow_symlinks=False) or st.st_ctime < since:
                        continue
                    report.checked += 1
                    object_id = prefix.name + entry.name
                    try:
                        intact = verity.digest_file(entry.path, self.alg).hex() == object_id
                    except OSError:
                        intact = False
                    if not intact:
                        os.unlink(entry.path)
                        report.removed.append(f"objects/{prefix.name}/{entry.name}")
            if report.removed:
                for top in ("streams", "images"):
                    for link in (self.path / top).iterdir():
                        if link.is_symlink() and not link.exists():
                            link.unlink()
                            report.unnamed.append(f"{top}/{link.name}")
            self.sync()
            for m in found:
                m.unlink()
            fsync_dir(markers)
        return report

    def write_stream(self, content_id: str, data: bytes) -> str:
        """Store a finished splitstream as an object and name it streams/<content_id>, once
        everything it refers to is durable."""
        object_id = self.ensure_object(data).object_id
        self.sync()
        link = self.stream_link(content_id)
        replace_symlink(link, relative_target(link, self.objects.path_of(object_id)))
        return object_id

    def open_stream(self, content_id: str, expected_type: int | None = None) -> splitstream.SplitStream:
        object_id = self.has_stream(content_id)
        if object_id is None:
            raise UserError(f"{self.path}: no stream {content_id}")
        return self.open_stream_object(object_id, expected_type, content_id)

    def open_stream_object(
        self, object_id: str, expected_type: int | None = None, label: str | None = None
    ) -> splitstream.SplitStream:
        try:
            stream = splitstream.parse(self.read_object(object_id), expected_type)
        except splitstream.SplitStreamError as e:
            raise UserError(f"{self.path}: stream {label or object_id}: {e}") from e
        if stream.alg is not self.alg:
            raise UserError(f"{self.path}: stream {label or object_id} uses {stream.alg.label}")
        return stream

    def cat_stream(self, stream: splitstream.SplitStream) -> Iterator[bytes]:
        """The stream's original bytes, chunk by chunk (external chunks read from their objects)."""
        for chunk in stream.chunks():
            yield chunk if isinstance(chunk, bytes) else self.read_object(chunk)

    def set_stream_ref(self, name: str, content_id: str) -> None:
        """streams/refs/<name> -> streams/<content_id> (a GC root). `name` is already escaped per part."""
        link = self.path / "streams" / "refs" / name
        replace_symlink(link, relative_target(link, self.stream_link(content_id)))

    def write_image(self, data: bytes) -> str:
        """Store an EROFS image as an object and name it images/<id>, once it is durable."""
        image_id = self.ensure_object(data).object_id
        self.sync()
        link = self.path / "images" / image_id
        replace_symlink(link, relative_target(link, self.objects.path_of(image_id)))
        return image_id

    def set_image_ref(self, name: str, image_id: str) -> None:
        link = self.path / "images" / "refs" / name
        replace_symlink(link, relative_target(link, self.path / "images" / image_id))

    def image_path(self, image_id: str) -> Path:
        return self.objects.path_of(image_id)

    def refs(self) -> dict[str, str | None]:
        """Every ref under streams/refs and images/refs, mapped to its object ID (None if broken)."""
        found = {
            str(link.relative_to(self.path)): object_id_of(link, self.objects.dir)
            for top in ("streams/refs", "images/refs")
            for link in links_under(self.path / top)
        }
        return dict(sorted(found.items()))

    def gc(
        self,
        dry_run: bool = False,
        extra_images: Iterable[str] = (),
        ignore_ref: Callable[[str], bool] | None = None,
    ) -> GcResult:
        """Remove what no ref reaches (exclusive lock); with `dry_run`, only say what would go.

        `extra_images` are EROFS image ids kept as well; refs for which `ignore_ref(path relative to
        the repository)` is true are not roots (the deployment GC's non-live refs in a dry run).
        """
        from bootc_unified.erofs.reader import referenced_objects

        with self.gc_lock():
            walker = Walker(self.read_object, referenced_objects)
            return collect(self.path, self.objects.dir, walker, dry_run, extra_images, ignore_ref)

    def fsck(self) -> FsckReport:
        report = FsckReport()
        with self.writer_lock():
            check_objects(self.objects, report)
            check_links(self, report)
        if report.problems and interrupted(self.path):
            report.problems.append(
                f"{TRANSACTIONS}/: a write was interrupted; `recover` or the next import removes what it left"
            )
        return report
