"""GC of both stores: deployments, kernel dirs, the bootc store and the repository
(bootc `BC/gc.rs` `composefs_gc`, reference/deployments.md section 8; DESIGN.md "Deployments").

Live = the deployments named (`composefs=<id>`) by an entry in `loader/entries` or
`loader/entries.staged`: booted, staged, rollback and any other entry in the boot menu. Then:

- `state/deploy/<id>/` of every other deployment goes (and a staged marker naming one);
- the temporaries a killed update left (`temporaries()`); the GC holds the sysroot lock
  (sysrootlock.py), so no verb is writing them;
- `EFI/Linux/bootc_composefs-<x>/` goes unless a live entry's `linux` path names that directory
  (by directory name, so a kernel dir shared under another deployment's id survives);
- the bootc store keeps (**better** than bootc, whose composefs GC keeps only host image names):
  each live deployment's host image (name from its `.origin`, and its manifest digest), the
  logically bound images of each live deployment (read from its EROFS image, no mount), and every
  store image whose layers an image in the system's store uses (podman#20603: an image built
  `FROM`, or pulled onto, an additional-store image keeps its parent layers there; removing that
  image from the additional store breaks it, "layer not known"); everything else is removed;
- the repository: missing `localhost/bootc-<digest>` refs of live deployments are recreated,
  those of other manifests removed (other refs untouched), then its GC runs with the live EROFS
  images as extra roots.

After finalize (at shutdown) only the first three run (`boot_only`, bootc's "boot binaries" GC plus
the state dirs): the stores are pruned by the next upgrade, switch or `internals gc`.

Never the booted deployment: when the booted id is in no entry the GC refuses. `dry_run` removes
nothing and reports what would go. A second run removes nothing. An image removed from the store
by hand is reported as missing, not an error.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from bootc_unified import faults
from bootc_unified.cstorage import Store
from bootc_unified.cstorage.records import ImageRecord, LayerRecord
from bootc_unified.deploy import bls, sysrootlock
from bootc_unified.deploy.finalize import writable_sysroot
from bootc_unified.deploy.lbi import BoundImage, bound_images_of_erofs, normalize
from bootc_unified.deploy.origin import Origin
from bootc_unified.deploy.staged import MARKER, StagedMarker
from bootc_unified.deploy.sysroot import MOUNTINFO, Esp, Sysroot, booted_id
from bootc_unified.errors import UserError
from bootc_unified.imgstore import ImageStore, PodmanError
from bootc_unified.importer import image_ref_name, manifest_content_id
from bootc_unified.repository import Repository

SYSTEM_STORE = Path("/var/lib/containers/storage")
REPO_REF_PREFIX = "localhost/bootc-"
RMI_BATCH = 100  # bootc removes 100 ids per podman call


def repo_ref_name(manifest_digest: str) -> str:
    return f"{REPO_REF_PREFIX}{manifest_digest}"


@dataclass
class LiveDeployment:
    depl_id: str
    role: str  # booted, staged, rollback, other
    kernel_dirs: set[str] = field(default_factory=set)
    origin: Origin | None = None
    bound: list[BoundImage] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.role} deployment {self.depl_id[:12]}"

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.depl_id,
            "role": self.role,
            "image": self.origin.imgref.image if self.origin else None,
            "manifest_digest": self.origin.image.manifest_digest if self.origin else None,
            "kernel_dirs": sorted(self.kernel_dirs),
            "bound_images": [b.image for b in self.bound],
        }


@dataclass
class StoreVerdict:
    """One image of the bootc store and why GC keeps it (no reasons: it goes)."""

    id: str
    names: tuple[str, ...]
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "names": list(self.names), "reasons": self.reasons}


@dataclass
class GcReport:
    dry_run: bool
    live: list[LiveDeployment] = field(default_factory=list)
    removed_deployments: list[str] = field(default_factory=list)
    removed_kernel_dirs: list[str] = field(default_factory=list)
    removed_staged_marker: bool = False
    removed_temporaries: list[str] = field(default_factory=list)  # what a killed verb left
    kept_images: list[StoreVerdict] = field(default_factory=list)
    removed_images: list[StoreVerdict] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)  # live roots not in the store
    removed_refs: list[str] = field(default_factory=list)
    recreated_refs: list[str] = field(default_factory=list)
    repo: dict[str, object] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    roots_incomplete: bool = False  # a live deployment's origin or bound images could not be read

    @property
    def removed_anything(self) -> bool:
        return bool(
            self.removed_deployments
            or self.removed_kernel_dirs
            or self.removed_staged_marker
            or self.removed_temporaries
            or self.removed_images
            or self.removed_refs
            or self.repo.get("removed_objects")
            or self.repo.get("removed_links")
        )

    def to_json(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "live": [d.to_json() for d in self.live],
            "removed_deployments": self.removed_deployments,
            "removed_kernel_dirs": self.removed_kernel_dirs,
            "removed_staged_marker": self.removed_staged_marker,
            "removed_temporaries": self.removed_temporaries,
            "kept_images": [v.to_json() for v in self.kept_images],
            "removed_images": [v.to_json() for v in self.removed_images],
            "missing_images": self.missing_images,
            "removed_refs": self.removed_refs,
            "recreated_refs": self.recreated_refs,
            "repository": self.repo,
            "problems": self.problems,
        }

    def render(self) -> str:
        verb = "Would remove" if self.dry_run else "Removed"
        lines = [f"Live deployments: {', '.join(d.label for d in self.live) or 'none'}"]
        for what, items in (
            ("deployment", self.removed_deployments),
            ("kernel dir", self.removed_kernel_dirs),
            ("temporary", self.removed_temporaries),
            ("image", [f"{v.id[:12]} ({', '.join(v.names) or '<none>'})" for v in self.removed_images]),
            ("ref", self.removed_refs),
        ):
            lines += [f"{verb} {what} {item}" for item in items]
        for v in self.kept_images:
            lines.append(f"Kept image {v.id[:12]} ({', '.join(v.names) or '<none>'}): {'; '.join(v.reasons)}")
        lines += [f"Missing from the store: {name}" for name in self.missing_images]
        objects, nbytes = self.repo.get("removed_objects", 0), self.repo.get("removed_bytes", 0)
        lines.append(f"{verb} {objects} repository objects ({nbytes} bytes)")
        lines += [f"Problem: {p}" for p in self.problems]
        return "\n".join(lines) + "\n"


# --- live deployments ----------------------------------------------------------------------------------


def live_deployments(esp: Esp, booted: str | None) -> list[LiveDeployment]:
    """The deployments named by entries (menu order, then staged), each with the kernel dirs its
    entries use. Raises when the booted id is in none of them."""
    found: dict[str, LiveDeployment] = {}
    menu = bls.read_entries(esp.entries)
    staged_entries = bls.read_entries(esp.entries_staged)
    menu_ids = []
    for ef in [*menu, *staged_entries]:
        arg = ef.entry.composefs
        if arg is None:
            continue
        dep = found.setdefault(arg.digest, LiveDeployment(arg.digest, "other"))
        if (kdir := ef.entry.kernel_dir_name) is not None:
            dep.kernel_dirs.add(kdir)
        if ef in menu:
            menu_ids.append(arg.digest)
    if booted is not None and booted not in found:
        raise UserError(
            f"deployment {booted} is booted but no boot entry names it; refusing to garbage-collect it"
        )
    rollback_given = False
    for depl_id, dep in found.items():
        if depl_id == booted:
            dep.role = "booted"
        elif depl_id not in menu_ids:
            dep.role = "staged"
        elif not rollback_given:
            dep.role, rollback_given = "rollback", True
    return list(found.values())


# --- the bootc store's roots ------------------------------------------------------------------------


def _image_keys(rec: ImageRecord) -> set[str]:
    """Names (as stored), ID and manifest digests, and name@digest forms, to match roots against."""
    keys = {*rec.names, rec.id, f"sha256:{rec.id}", *rec.all_digests}
    for name in rec.names:
        repo = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
        keys.update(f"{repo}@{d}" for d in rec.all_digests)
    return keys


def _chain(top: str | None, layers: dict[str, LayerRecord]) -> list[str]:
    out: list[str] = []
    while top is not None and top in layers and len(out) <= len(layers):
        out.append(top)
        top = layers[top].parent
    return out


def system_store_users(system_store: Path, store_layers: dict[str, LayerRecord]) -> dict[str, list[str]]:
    """For each bootc-store layer an image in the system store stands on: "<name> (DiffID ...)".

    The system store's image records name a top layer; its parent chain runs through the system
    store's own layers and on into the bootc store's (an additional image store).
    """
    if not (system_store / "overlay-images").is_dir():
        return {}
    system = Store.open(system_store)
    with system.read_lock():
        records = system.image_records()
        sys_layers = system.layer_records()
    both = {**store_layers, **sys_layers}
    users: dict[str, list[str]] = {}
    for rec in records:
        label = rec.names[0] if rec.names else rec.id[:12]
        for layer_id in _chain(rec.top_layer, both):
            if layer_id in store_layers and layer_id not in sys_layers:
                diff = store_layers[layer_id].diff_digest or layer_id
                users.setdefault(layer_id, []).append(f"{label} (layer {diff})")
    return users


def store_verdicts(
    store_root: Path,
    live: list[LiveDeployment],
    system_store: Path | None,
) -> tuple[list[StoreVerdict], list[str]]:
    """Every image of the bootc store with its reasons to stay; and the live roots it lacks."""
    store = Store.open(store_root)
    with store.read_lock():
        records = store.image_records()
        layers = store.layer_records()
    users = system_store_users(system_store, layers) if system_store is not None else {}
    verdicts = []
    matched: set[str] = set()
    for rec in records:
        keys = _image_keys(rec)
        v = StoreVerdict(rec.id, rec.names)
        for dep in live:
            if dep.origin is not None:
                name = normalize(dep.origin.imgref.image)
                digest = dep.origin.image.manifest_digest
                if name in keys or digest in keys:
                    v.reasons.append(f"host image of the {dep.label}")
                    matched.add(f"host:{dep.depl_id}")
            for b in dep.bound:
                if b.name in keys:
                    v.reasons.append(f"bound by {b.file} in the {dep.label}")
                    matched.add(f"lbi:{b.name}")
        used = sorted({u for layer_id in _chain(rec.top_layer, layers) for u in users.get(layer_id, [])})
        v.reasons += [f"system-store image {u} stands on it" for u in used]
        verdicts.append(v)
    missing = []
    for dep in live:
        if dep.origin is not None and f"host:{dep.depl_id}" not in matched:
            missing.append(f"{normalize(dep.origin.imgref.image)} (host image of the {dep.label})")
        missing += [
            f"{b.name} (bound in the {dep.label})" for b in dep.bound if f"lbi:{b.name}" not in matched
        ]
    return verdicts, sorted(set(missing))


def _rmi(store: ImageStore, ids: list[str]) -> None:
    """`podman rmi --force`, batched; an image already gone (removed by hand) is not an error."""
    for i in range(0, len(ids), RMI_BATCH):
        batch = ids[i : i + RMI_BATCH]
        try:
            store.podman(["rmi", "--force", *batch])
        except PodmanError:
            for image_id in batch:
                proc = store.podman(["rmi", "--force", image_id], check=False)
                if proc.returncode != 0 and "image not known" not in proc.stderr:
                    raise PodmanError(["rmi", image_id], proc.returncode, proc.stderr) from None


# --- the verb ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GcOpts:
    sysroot: Path
    esp: Path
    dry_run: bool = False
    mountinfo: Path = MOUNTINFO
    staged_marker: Path = MARKER
    system_store: Path | None = SYSTEM_STORE
    boot_only: bool = False  # state dirs, staged marker and kernel dirs only (after finalize)


def analyse(opts: GcOpts) -> tuple[Sysroot, Esp, Repository | None, GcReport]:
    """Live deployments with their origins and bound images; nothing is changed."""
    sysroot, esp = Sysroot(opts.sysroot), Esp(opts.esp)
    report = GcReport(opts.dry_run)
    report.live = live_deployments(esp, booted_id(opts.mountinfo))
    repo = Repository.open(sysroot.repo) if (sysroot.repo / "meta.json").exists() else None
    for dep in report.live:
        try:
            dep.origin = Origin.read(sysroot.origin(dep.depl_id))
        except UserError as e:
            report.problems.append(f"{dep.label}: {e}")
            report.roots_incomplete = True
        if repo is None:
            report.problems.append(f"{dep.label}: no composefs repository at {sysroot.repo}")
            report.roots_incomplete = True
            continue
        try:
            dep.bound = bound_images_of_erofs(repo.read_object(dep.depl_id), repo.read_object)
        except UserError as e:
            report.problems.append(f"{dep.label}: bound images unknown: {e}")
            report.roots_incomplete = True
        except ValueError as e:  # erofs ImageError
            report.problems.append(f"{dep.label}: bound images unknown: EROFS image {dep.depl_id}: {e}")
            report.roots_incomplete = True
    return sysroot, esp, repo, report


UPDATE_STORE_PREFIX = ".update-storage-"  # update.py's temporary store (direct path)


def temporaries(sysroot: Sysroot, esp: Esp) -> list[Path]:
    """Temporary directories the deployment verbs write and rename into place: a state dir being
    written (`state/deploy/.<id>.*`), staged or rollback entries being built (`loader/.entries.*`),
    a kernel dir being copied (`EFI/Linux/.bootc_composefs-*`), the direct path's store
    (`ostree/bootc/.update-storage-*`). Only a killed run leaves them. (set-unified's own
    `.set-unified*` directories are recovered by its next run: not here.)"""
    found: list[Path] = []
    for directory, pattern in (
        (sysroot.deploy_dir, ".*"),
        (esp.entries.parent, ".entries.*"),
        (esp.linux, ".*"),
        (sysroot.store.parent, f"{UPDATE_STORE_PREFIX}*"),
    ):
        if directory.is_dir():
            found += sorted(p for p in directory.glob(pattern) if p.is_dir() and not p.is_symlink())
    return found


def gc(opts: GcOpts) -> GcReport:
    """The GC, under the sysroot lock (an update or set-unified in progress finishes first)."""
    with sysrootlock.locked(opts.sysroot):
        if not opts.dry_run:
            writable_sysroot(opts.sysroot)  # a booted system's /sysroot is a read-only bind
        return _gc(opts)


def _gc(opts: GcOpts) -> GcReport:
    sysroot, esp, repo, report = analyse(opts)
    live_ids = {d.depl_id for d in report.live}
    live_kdirs = {k for d in report.live for k in d.kernel_dirs}

    # 1. state dirs and the staged marker
    if sysroot.deploy_dir.is_dir():
        for name in sorted(os.listdir(sysroot.deploy_dir)):
            path = sysroot.deploy_dir / name
            if name.startswith(".") or name in live_ids or not path.is_dir():
                continue  # hidden: a temporary (below)
            report.removed_deployments.append(name)
            if not opts.dry_run:
                faults.point("gc-state-dir")
                shutil.rmtree(path)
    marker = StagedMarker.read(opts.staged_marker)
    if marker is not None and marker.depl_id not in live_ids:
        report.removed_staged_marker = True
        if not opts.dry_run:
            opts.staged_marker.unlink(missing_ok=True)

    # 2. kernel dirs
    for kdir in esp.kernel_dirs():
        if kdir.name not in live_kdirs:
            report.removed_kernel_dirs.append(kdir.name)
            if not opts.dry_run:
                faults.point("gc-kernel-dir")
                shutil.rmtree(kdir)

    # 2b. what a killed update left: its temporaries (nothing writes them while we hold the lock)
    for path in temporaries(sysroot, esp):
        report.removed_temporaries.append(str(path))
        if not opts.dry_run:
            if path.name.startswith(UPDATE_STORE_PREFIX):
                ImageStore(path).cleanup_runtime()
            shutil.rmtree(path, ignore_errors=True)

    if opts.boot_only:
        return report

    # 3. the bootc store
    if (sysroot.store / "overlay-images").is_dir():
        verdicts, report.missing_images = store_verdicts(sysroot.store, report.live, opts.system_store)
        for v in verdicts:
            if not v.reasons and report.roots_incomplete:
                v.reasons.append("the roots of a live deployment could not be read (see problems)")
            (report.kept_images if v.reasons else report.removed_images).append(v)
        if report.removed_images and not opts.dry_run:
            faults.point("gc-before-rmi")
            _rmi(ImageStore(sysroot.store), [v.id for v in report.removed_images])
            faults.point("gc-after-rmi")

    # 4. the repository
    if repo is not None:
        live_refs = {
            image_ref_name(repo_ref_name(d.origin.image.manifest_digest)) for d in report.live if d.origin
        }
        prefix = image_ref_name(REPO_REF_PREFIX)
        stale = []
        for top in ("streams/refs", "images/refs"):
            base = repo.path / top
            if not base.is_dir():
                continue
            for link in sorted(base.rglob("*")):
                rel = str(link.relative_to(base))
                if (
                    link.is_symlink()
                    and rel.startswith(prefix)
                    and rel not in live_refs
                    and not report.roots_incomplete  # a live deployment's ref is not known
                ):
                    stale.append(f"{top}/{rel}")
        report.removed_refs = stale
        if not opts.dry_run:
            for d in report.live:
                if d.origin is None:
                    continue
                name = image_ref_name(repo_ref_name(d.origin.image.manifest_digest))
                stream = repo.path / "streams/refs" / name
                if not stream.is_symlink() and repo.has_stream(
                    manifest_content_id(d.origin.image.manifest_digest)
                ):
                    repo.set_stream_ref(name, manifest_content_id(d.origin.image.manifest_digest))
                    report.recreated_refs.append(f"streams/refs/{name}")
                image = repo.path / "images/refs" / name
                if not image.is_symlink() and (repo.path / "images" / d.depl_id).is_symlink():
                    repo.set_image_ref(name, d.depl_id)
                    report.recreated_refs.append(f"images/refs/{name}")
            for rel in stale:
                faults.point("gc-stale-ref")
                (repo.path / rel).unlink(missing_ok=True)
        stale_set = set(stale)
        result = repo.gc(opts.dry_run, extra_images=sorted(live_ids), ignore_ref=stale_set.__contains__)
        report.repo = result.to_json()
        if opts.dry_run:
            # the stale refs would go first; collect() lists links only when their target goes
            report.repo["removed_links"] = sorted(set(report.repo["removed_links"]) - stale_set)  # type: ignore[call-overload]
    return report


def live_roots(opts: GcOpts) -> tuple[GcReport, list[StoreVerdict]]:
    """What `image list` shows: the live deployments and every store image with its reasons."""
    sysroot, _esp, _repo, report = analyse(opts)
    verdicts: list[StoreVerdict] = []
    if (sysroot.store / "overlay-images").is_dir():
        verdicts, report.missing_images = store_verdicts(sysroot.store, report.live, opts.system_store)
    return report, verdicts
