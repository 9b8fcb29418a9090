"""`image set-unified`: put the booted image into the bootc store, then keep it on disk once.

bootc (reference/deployments.md section 12) puts the booted image into its store so that later
upgrades take the unified path; that doubles the image on disk until a GC. Here:

1. The booted deployment (`composefs:<id>` on / in mountinfo) and its `.origin`: image name and
   manifest digest. A read-only /sysroot is made writable for this process (finalize.writable_sysroot).
2. Already in the store (an image known by that manifest digest): said in one line, nothing
   fetched. Else, for a registry origin, `podman pull NAME@DIGEST` (exactly the deployed image,
   whatever the tag says now); when that fails (registry unreachable, image gone) or the origin is
   not a registry, the image is rebuilt from the repository (`export.rebuild`: exact layer tars,
   the original manifest). Either way the store's image must then carry the origin's manifest
   digest, the config's DiffIDs and the repository's. The origin's name is tagged on it when no
   other image in the store holds that name.
3. Dedupe (`dedupe.share_layers`): each of the image's store files shares its data with the
   repository object of the same content (FIDEDUPERANGE on btrfs/XFS, a hardlink to the object on
   ext4), with counts of what was shared and what stays duplicated and why. Run every time, so a
   second run (or one after a crash) completes the work and otherwise changes nothing.

The record that the system is unified is the image in the store: status shows `unified`, and
upgrade takes the unified path when the store holds the booted image's manifest digest. The
repository is not changed (objects may get the metadata of the file they are linked to, which
composefs does not read).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bootc_unified import dedupe, export
from bootc_unified.cstorage import Store
from bootc_unified.deploy import sysrootlock
from bootc_unified.deploy.finalize import writable_sysroot
from bootc_unified.deploy.origin import Origin
from bootc_unified.deploy.sysroot import MOUNTINFO, Sysroot, booted_id
from bootc_unified.errors import UserError
from bootc_unified.imgstore import ImageStore, PullPolicy, store_path
from bootc_unified.progress import NullProgress, Progress, ProgressSteps
from bootc_unified.repository import Repository

STAGING = ".set-unified"  # beside the store: dedupe's staging directory
REBUILD_PREFIX = ".set-unified-rebuild-"  # beside the store: export.rebuild's work directories
PRESENT = "already-present"
REGISTRY = "registry"
REPOSITORY = "repository"


@dataclass(frozen=True)
class SetUnifiedOpts:
    sysroot: Path = Path("/sysroot")
    mountinfo: Path | None = None
    tls_verify: bool = True
    authfile: Path | None = None
    progress_fd: int | None = None


@dataclass
class SetUnifiedResult:
    deployment: str
    image: str  # the origin's image name
    manifest_digest: str
    store_image_id: str
    source: str  # PRESENT, REGISTRY or REPOSITORY
    why_rebuilt: str | None  # the reason the registry was not used
    tagged: str | None  # the name given to the image in the store, if any
    dedupe: dedupe.DedupeStats = field(default_factory=dedupe.DedupeStats)

    def to_json(self) -> dict[str, object]:
        return {
            "deployment": self.deployment,
            "image": self.image,
            "manifest_digest": self.manifest_digest,
            "store_image_id": self.store_image_id,
            "source": self.source,
            "why_rebuilt": self.why_rebuilt,
            "tagged": self.tagged,
            "dedupe": self.dedupe.to_json(),
        }

    def summary(self) -> str:
        if self.source == PRESENT:
            first = f"Image {self.image} ({self.manifest_digest}) is already in the bootc store"
        elif self.source == REGISTRY:
            first = f"Pulled {self.image} ({self.manifest_digest}) into the bootc store from the registry"
        else:
            first = (
                f"Rebuilt {self.image} ({self.manifest_digest}) into the bootc store from the repository "
                f"({self.why_rebuilt})"
            )
        lines = [first]
        if self.tagged:
            lines.append(f"  tagged: {self.tagged}")
        lines.append(f"  {self.dedupe.summary()}")
        return "\n".join(lines) + "\n"


def store_image_by_digest(store_root: Path, manifest_digest: str) -> str | None:
    """The ID of an image in the store known by `manifest_digest` (its records, no podman)."""
    if not (store_root / "overlay-images").is_dir():
        return None
    for rec in Store.open(store_root).images():
        if manifest_digest in rec.all_digests:
            return rec.id
    return None


def digest_ref(name: str, manifest_digest: str) -> str:
    """`REGISTRY/REPO@DIGEST` for a name with or without a tag (or a digest)."""
    repo = name.split("@", 1)[0]
    last = repo.rsplit("/", 1)[-1]
    if ":" in last:
        repo = repo.rsplit(":", 1)[0]
    return f"{repo}@{manifest_digest}"


def _verify(store: ImageStore, image_id: str, expected: export.RepoImage) -> None:
    """The store's image is the deployed one: manifest digest, config, DiffIDs."""
    image = Store.open(store.root).image(image_id)
    problems = []
    if image.manifest_digest != expected.manifest_digest:
        problems.append(f"manifest {image.manifest_digest}")
    if image.config_digest != expected.config_digest:
        problems.append(f"config {image.config_digest}")
    if [layer.diff_id for layer in image.layers] != expected.diff_ids:
        problems.append("other DiffIDs")
    if problems:
        raise UserError(
            f"image {image_id[:12]} in {store.root} is not the deployed image "
            f"{expected.manifest_digest}: {', '.join(problems)}"
        )


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """One set-unified at a time per store (flock on the directory holding it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_stale_workdirs(directory: Path) -> None:
    """What a killed rebuild left: its scratch store's runtime directory and its work directory."""
    for stale in directory.glob(f"{REBUILD_PREFIX}*"):
        ImageStore(stale / "storage").cleanup_runtime()
        shutil.rmtree(stale, ignore_errors=True)


def _step(progress: Progress, task: str, description: str, ident: str, done: bool) -> None:
    progress.send(ProgressSteps(task, description, ident, steps=int(done), steps_total=1), True)


def set_unified(opts: SetUnifiedOpts, progress: Progress | None = None) -> SetUnifiedResult:
    """Under the sysroot lock (sysrootlock.py): a GC waits until the image is in the store."""
    with sysrootlock.locked(opts.sysroot):
        return _set_unified(opts, progress)


def _set_unified(opts: SetUnifiedOpts, progress: Progress | None) -> SetUnifiedResult:
    progress = progress or NullProgress()
    sysroot = Sysroot(opts.sysroot)
    depl_id = booted_id(opts.mountinfo or MOUNTINFO)
    if depl_id is None:
        raise UserError("not booted from a composefs deployment (no composefs:<id> mount on /)")
    origin = Origin.read(sysroot.origin(depl_id))
    ref, digest = origin.imgref, origin.image.manifest_digest
    repo = Repository.open(sysroot.repo)
    writable_sysroot(sysroot.root)  # a booted system's /sysroot is read-only (private rw remount)
    created = not store_path(sysroot.root).is_dir()
    store = ImageStore.ensure(sysroot.root, opts.authfile)
    staging = store.root.parent / STAGING
    added: str | None = None  # an image this run put into the store (removed again on failure)
    try:
        with _exclusive(store.root.parent), repo.writer_lock():
            _remove_stale_workdirs(store.root.parent)
            expected = export.repo_image(repo, digest)
            image_id = store_image_by_digest(store.root, digest)
            source, why = PRESENT, None
            if image_id is None:
                source, image_id, why = _fetch(
                    repo, store, ref.image, ref.transport, expected, opts, progress
                )
                added = image_id
            _verify(store, image_id, expected)
            tagged = store.tag_unless_taken(image_id, ref.image) if ref.transport == "registry" else None
            _step(progress, "dedupe", "Sharing files with the repository", digest, False)
            cstore = Store.open(store.root)
            with cstore.read_lock():
                stats = dedupe.share_layers(repo, cstore.image(image_id).layers, staging)
            _step(progress, "dedupe", "Sharing files with the repository", digest, True)
    except BaseException:
        if added is not None:
            store.podman(["rmi", "--force", added], check=False)
        if created:
            store.cleanup_runtime()
            shutil.rmtree(store.root, ignore_errors=True)
        raise
    return SetUnifiedResult(depl_id, ref.image, digest, image_id, source, why, tagged, stats)


def _fetch(
    repo: Repository,
    store: ImageStore,
    name: str,
    transport: str,
    expected: export.RepoImage,
    opts: SetUnifiedOpts,
    progress: Progress,
) -> tuple[str, str, str | None]:
    """(source, image ID, why the registry was not used) after putting the image into the store."""
    if transport == "registry":
        try:
            pulled = store.pull(
                f"docker://{digest_ref(name, expected.manifest_digest)}",
                PullPolicy.ALWAYS,
                opts.tls_verify,
                progress,
            )
            return REGISTRY, pulled.id, None
        except UserError as e:
            why = f"registry: {e}"
    else:
        why = f"the origin's transport is {transport}, not a registry"
    workdir = store.root.parent / f"{REBUILD_PREFIX}{secrets.token_hex(6)}"
    image_id = export.rebuild(repo, expected, store, workdir, progress)
    return REPOSITORY, image_id, why
