"""GC of an ostree sysroot's image refs, its repository and the bootc store, as bootc's ostree backend
does it (ostree-ext `container::store::gc_image_layers` after `image prune`).

Roots: the images named by the deployments' origins (every deployment a BLS entry boots,
sysroot.py) and the logically bound images of each (its checkout's `/usr/lib/bootc/bound-images.d`,
read with deploy/lbi.py). Then:

- every `ostree/container/image/*` ref no deployment's origin names is deleted (other refs, and the
  deployments' own `ostree/B/S/N` refs, untouched);
- `ostree prune --refs-only`: objects reachable from no ref go (a deployment's commit stays
  through its deployment ref);
- the bootc store (`<sysroot>/ostree/bootc/storage`, when there is one) keeps each deployment's
  image (by name and by the manifest digest in its commit's metadata) and the bound images;
  everything else is removed (`ImageStore.prune_except_roots`).

`dry_run` removes nothing and reports what would go. A second run removes nothing.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bootc_unified.deploy import sysrootlock
from bootc_unified.deploy.lbi import bound_images_of_dir
from bootc_unified.errors import UserError
from bootc_unified.imgstore import ImageStore, store_path

from .importer import IMAGE_PREFIX, META_MANIFEST_DIGEST
from .repo import OstreeRepo, run_ostree
from .sysroot import Deployment, OstreeSysroot


@dataclass
class OstreeGcReport:
    deployments: list[Deployment] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)  # store roots: image names and digests, bound images
    kept_refs: list[str] = field(default_factory=list)
    removed_refs: list[str] = field(default_factory=list)
    pruned_objects: int = 0
    freed: str = ""  # as ostree prune says it
    removed_images: list[dict[str, object]] = field(default_factory=list)
    dry_run: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "deployments": [d.to_json() for d in self.deployments],
            "roots": self.roots,
            "kept_refs": self.kept_refs,
            "removed_refs": self.removed_refs,
            "pruned_objects": self.pruned_objects,
            "freed": self.freed,
            "removed_images": self.removed_images,
        }


def manifest_digest(repo: OstreeRepo, commit: str) -> str | None:
    """The `ostree.manifest-digest` of a commit (None: not imported from a container image)."""
    proc = subprocess.run(
        ["ostree", "show", f"--repo={repo.path}", f"--print-metadata-key={META_MANIFEST_DIGEST}", commit],
        capture_output=True,
        text=True,
    )
    m = re.fullmatch(r"'(sha256:[0-9a-f]{64})'", proc.stdout.strip()) if proc.returncode == 0 else None
    return m.group(1) if m else None


def registry_name(imgref: str) -> str | None:
    """The store name of an image reference: `registry:NAME` -> NAME (other transports: None)."""
    return imgref.removeprefix("registry:") if imgref.startswith("registry:") else None


def gc(sysroot: Path, dry_run: bool = False) -> OstreeGcReport:
    """Under the sysroot lock (deploy/sysrootlock.py), as the composefs side's GC."""
    with sysrootlock.locked(sysroot):
        return _gc(sysroot, dry_run)


def _gc(sysroot: Path, dry_run: bool) -> OstreeGcReport:
    sr = OstreeSysroot(sysroot)
    repo = sr.repo
    report = OstreeGcReport(deployments=sr.deployments(), dry_run=dry_run)
    if not report.deployments:
        raise UserError(
            f"{sysroot}: no deployment in {sr.boot / 'loader/entries'}; refusing to GC everything"
        )
    keep: set[str] = set()
    roots: set[str] = set()
    for d in report.deployments:
        if d.imgref is not None and d.image_ref is not None:
            keep.add(d.image_ref)
            if (name := registry_name(d.imgref)) is not None:
                roots.add(name)
        if (digest := manifest_digest(repo, d.checksum)) is not None:
            roots.add(digest)
        try:
            roots.update(b.name for b in bound_images_of_dir(d.path))
        except UserError as e:
            raise UserError(f"deployment {d.path.name}: {e}") from None
    report.roots = sorted(roots)
    for ref in repo.refs(IMAGE_PREFIX):
        (report.kept_refs if ref in keep else report.removed_refs).append(ref)
    if store_path(sr.root).is_dir():
        store = ImageStore.open(sr.root)
        wanted = set(roots)
        victims = [img for img in store.images() if not (img.keys() & wanted)]
        report.removed_images = [img.to_json() for img in victims]
    if dry_run:
        return report
    for ref in report.removed_refs:
        run_ostree("refs", f"--repo={repo.path}", "--delete", ref, what=str(repo.path))
    out = run_ostree("prune", f"--repo={repo.path}", "--refs-only", what=str(repo.path))
    if m := re.search(r"Deleted (\d+) objects?, (.+?) freed", out):
        report.pruned_objects, report.freed = int(m.group(1)), m.group(2)
    if report.removed_images:
        ImageStore.open(sr.root).prune_except_roots(roots)
    return report
