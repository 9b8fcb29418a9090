"""`image set-unified --backend ostree`: on an ostree sysroot, put the deployed image into the bootc
store and make the repository's objects share their data with the store's files.

1. The deployment: the booted one (`ostree=` on /proc/cmdline, when it leads to a deployment of
   this sysroot), else the default (the first BLS entry). Its origin names the image
   (`container-image-reference`), its commit's `ostree.manifest-digest` the exact manifest.
2. In the store already (an image known by that digest): nothing fetched. Else, for a registry
   origin, `podman pull NAME@DIGEST` into `<sysroot>/ostree/bootc/storage`. The repository holds no
   tar-split, so an image the registry no longer serves cannot be rebuilt from it (an error). The
   origin's name is tagged on the image when no other image there holds it.
3. The image is imported again from the store (importer.py): every object exists (PRESENT), so
   nothing is written but the commit, if the deployed one was made by another importer, and the
   image ref `ostree/container/image/...` is set.
4. share.py: each store file shares its data with the object of the same content (FIDEDUPERANGE on
   btrfs/XFS, the object's inode on ext4). Run every time: a second run changes nothing.

An image this run pulled is removed again when a later step fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from bootc_unified import dedupe
from bootc_unified.cstorage import Store
from bootc_unified.deploy import sysrootlock
from bootc_unified.deploy.setunified import digest_ref, store_image_by_digest
from bootc_unified.errors import UserError
from bootc_unified.imgstore import ImageStore, PullPolicy
from bootc_unified.progress import NullProgress, Progress

from .gc import manifest_digest, registry_name
from .importer import OstreeImportResult, import_image
from .share import share_objects
from .sysroot import Deployment, OstreeSysroot

STAGING = ".set-unified-ostree"  # beside the store: the hardlink method's staging directory
PRESENT = "already-present"
REGISTRY = "registry"


@dataclass
class OstreeSetUnifiedResult:
    deployment: str
    imgref: str
    manifest_digest: str
    store_image_id: str
    source: str  # PRESENT or REGISTRY
    tagged: str | None
    commit: str
    imported: OstreeImportResult
    dedupe: dedupe.DedupeStats = field(default_factory=dedupe.DedupeStats)

    def to_json(self) -> dict[str, object]:
        return {
            "backend": "ostree",
            "deployment": self.deployment,
            "image": self.imgref,
            "manifest_digest": self.manifest_digest,
            "store_image_id": self.store_image_id,
            "source": self.source,
            "tagged": self.tagged,
            "commit": self.commit,
            "objects": self.imported.to_json()["objects"],
            "dedupe": self.dedupe.to_json(),
        }

    def summary(self) -> str:
        where = "is already in" if self.source == PRESENT else "pulled into"
        lines = [f"Image {self.imgref} ({self.manifest_digest}) {where} the bootc store"]
        if self.tagged:
            lines.append(f"  tagged: {self.tagged}")
        lines.append(f"  ostree commit {self.commit} (deployment {self.deployment})")
        lines.append(f"  {self.dedupe.summary()}")
        return "\n".join(lines) + "\n"


def cmdline_deployment(sysroot: OstreeSysroot, cmdline: Path) -> Deployment | None:
    """The deployment `ostree=` on the kernel command line boots, if it is one of this sysroot's."""
    try:
        text = cmdline.read_text()
    except OSError:
        return None
    m = re.search(r"(?:^|\s)ostree=(\S+)", text)
    if m is None:
        return None
    link = sysroot.root / m.group(1).lstrip("/")
    try:
        target = link.resolve(strict=True)
    except OSError:
        return None
    return next((d for d in sysroot.deployments() if d.path == target), None)


def set_unified(
    sysroot: Path,
    tls_verify: bool = True,
    authfile: Path | None = None,
    cmdline: Path = Path("/proc/cmdline"),
    progress: Progress | None = None,
) -> OstreeSetUnifiedResult:
    """Under the sysroot lock (deploy/sysrootlock.py): a GC waits until the image is in the store."""
    with sysrootlock.locked(sysroot):
        return _set_unified(sysroot, tls_verify, authfile, cmdline, progress)


def _set_unified(
    sysroot: Path,
    tls_verify: bool,
    authfile: Path | None,
    cmdline: Path,
    progress: Progress | None,
) -> OstreeSetUnifiedResult:
    progress = progress or NullProgress()
    sr = OstreeSysroot(sysroot)
    repo = sr.repo
    deployments = sr.deployments()
    if not deployments:
        raise UserError(f"{sysroot}: no ostree deployment (no BLS entry with ostree=)")
    depl = cmdline_deployment(sr, cmdline) or deployments[0]
    if depl.imgref is None:
        raise UserError(f"deployment {depl.path.name}: its origin names no container image")
    digest = manifest_digest(repo, depl.checksum)
    if digest is None:
        raise UserError(f"deployment {depl.path.name}: commit {depl.checksum} has no ostree.manifest-digest")
    store = ImageStore.ensure(sr.root, authfile)
    image_id = store_image_by_digest(store.root, digest)
    source, added = PRESENT, None
    name = registry_name(depl.imgref)
    try:
        if image_id is None:
            if name is None:
                raise UserError(
                    f"{depl.imgref}: not a registry image; the ostree repository cannot rebuild it "
                    "for the store (no tar-split)"
                )
            pulled = store.pull(
                f"docker://{digest_ref(name, digest)}", PullPolicy.ALWAYS, tls_verify, progress
            )
            source, image_id = REGISTRY, pulled.id
            added = image_id
            if store_image_by_digest(store.root, digest) != image_id:
                raise UserError(f"{name}: the registry's image does not have manifest digest {digest}")
        tagged = store.tag_unless_taken(image_id, name) if name is not None else None
        cstore = Store.open(store.root)
        imported = import_image(repo, cstore, image_id, imgref=depl.imgref)
        assert imported.tree is not None
        with cstore.read_lock():
            stats = share_objects(repo, imported.tree, store.root.parent / STAGING)
    except BaseException:
        if added is not None:
            store.podman(["rmi", "--force", added], check=False)
        raise
    return OstreeSetUnifiedResult(
        depl.path.name, depl.imgref, digest, image_id, source, tagged, imported.commit, imported, stats
    )
