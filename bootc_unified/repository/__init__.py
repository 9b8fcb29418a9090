"""The composefs repository (as composefs-rs lays it out): objects, locks, fsck.

meta.json                 version, algorithm, features
objects/XX/<rest>         content-addressed by fs-verity digest
streams/, streams/refs/   splitstreams and their GC roots
images/, images/refs/     EROFS images and their names
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path

from bootc_unified import verity
from bootc_unified.errors import UserError
from bootc_unified.repository import lock
from bootc_unified.repository.fsck import FsckReport, check_objects
from bootc_unified.repository.meta import Meta
from bootc_unified.repository.objects import Method, ObjectResult, ObjectStore
from bootc_unified.verity import HashAlg

__all__ = ["Method", "ObjectResult", "Repository"]

SUBDIRS = ("objects", "streams", "streams/refs", "images", "images/refs")


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

    def ensure_object_from_file(self, path: Path, zerocopy: bool = False) -> ObjectResult:
        return self.objects.ensure_object_from_file(path, zerocopy_only=zerocopy)

    def fsck(self) -> FsckReport:
        report = FsckReport()
        with self.writer_lock():
            check_objects(self.objects, report)
        return report
