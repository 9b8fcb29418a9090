"""Check a repository: every object re-digested against its name, nothing stray in objects/."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bootc_unified import verity
from bootc_unified.repository import splitstream
from bootc_unified.repository.objects import ObjectStore, describe_kind
from bootc_unified.repository.refs import links_under, object_id_of

if TYPE_CHECKING:
    from bootc_unified.repository import Repository


@dataclass
class FsckReport:
    objects: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_objects(store: ObjectStore, report: FsckReport) -> None:
    hexlen = store.alg.size * 2
    prefix_re = re.compile(r"[0-9a-f]{2}")
    rest_re = re.compile(rf"[0-9a-f]{{{hexlen - 2}}}")
    for prefix in sorted(os.listdir(store.dir)):
        pdir = store.dir / prefix
        if not prefix_re.fullmatch(prefix) or not pdir.is_dir() or pdir.is_symlink():
            report.problems.append(f"stray entry objects/{prefix}")
            continue
        for rest in sorted(os.listdir(pdir)):
            rel = f"objects/{prefix}/{rest}"
            st = os.lstat(pdir / rest)
            if not rest_re.fullmatch(rest):
                report.problems.append(f"stray entry {rel}")
                continue
            if not stat.S_ISREG(st.st_mode):
                report.problems.append(f"bad object {rel}: is {describe_kind(st.st_mode)}")
                continue
            report.objects += 1
            _check_one(store, prefix + rest, rel, report)


def _check_one(store: ObjectStore, object_id: str, rel: str, report: FsckReport) -> None:
    path = store.dir / rel.removeprefix("objects/")
    try:
        actual = verity.digest_file(path, store.alg).hex()
    except OSError as e:
        report.problems.append(f"unreadable object {rel}: {e.strerror}")
        return
    if actual != object_id:
        report.problems.append(f"corrupt object {rel}: content digest is {actual}")
        return
    if store.insecure:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        measured = verity.measure(fd)
    except verity.VerityUnsupported:
        measured = None
    finally:
        os.close(fd)
    if measured is None:
        report.problems.append(f"object {rel}: fs-verity is not enabled on it")
    elif measured[1].hex() != object_id:
        report.problems.append(f"object {rel}: kernel fs-verity digest is {measured[1].hex()}")


def check_links(repo: Repository, report: FsckReport) -> None:
    """Refs resolve; every named stream parses and its objects exist; every named image parses and
    the objects it redirects to exist."""
    from bootc_unified.erofs.errors import ImageError
    from bootc_unified.erofs.reader import referenced_objects

    objects = repo.objects
    for link in links_under(repo.path / "streams") + links_under(repo.path / "images"):  # no .tmp-
        rel = link.relative_to(repo.path)
        object_id = object_id_of(link, objects.dir)
        if object_id is None:
            report.problems.append(f"broken link {rel}")
            continue
        if rel.parts[1] == "refs":
            continue  # what it names is checked through streams/<id> and images/<id>
        try:
            data = objects.path_of(object_id).read_bytes()
        except OSError as e:  # EIO: fs-verity or the filesystem's checksum (check_objects names it too)
            path = f"objects/{object_id[:2]}/{object_id[2:]}"
            report.problems.append(f"unreadable {rel} ({path}): {e.strerror}")
            continue
        if rel.parts[0] == "streams":
            try:
                stream = splitstream.parse(data)
            except splitstream.SplitStreamError as e:
                report.problems.append(f"bad stream {rel}: {e}")
                continue
            needed = stream.object_refs + [t for n, t in stream.named_refs.items()]
        else:
            try:
                needed = sorted(referenced_objects(data))
            except ImageError as e:
                report.problems.append(f"bad image {rel}: {e}")
                continue
        for missing in (o for o in needed if o not in objects):
            report.problems.append(f"{rel} refers to missing object {missing}")
