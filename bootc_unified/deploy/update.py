"""What upgrade and switch share (bootc `BC/update.rs` `do_upgrade`, `BC/switch.rs`,
reference/deployments.md sections 6, 10, 12, 13): from a target image reference to a staged
deployment.

In order:
  1. the pull path (`choose_path`): **unified** when the bootc store (<root>/ostree/bootc/storage)
     holds the booted image (matched by the booted origin's manifest digest, so an image renamed
     since still counts) or an image of the target's name, or switch asked for it; else **direct**;
  2. registry targets: the remote manifest (deploy/remote.py), and the disk-space check: the
     compressed sizes of the layers the repository does not have yet vs the free space of the
     filesystem holding composefs/objects (bootc's rule, no reserve);
  3. pull: unified = into the bootc store with progress (podman), imported zero-copy from there;
     direct = into a temporary containers-storage beside the bootc store (same filesystem,
     ostree/bootc/.update-storage-*), imported, and the temporary store removed (objects
     reflinked or hardlinked from it keep their data). Then the EROFS image: its id is the new
     deployment id, the ref `localhost/bootc-<manifest digest>`;
  4. an id equal to a deployment already in the boot menu (or staged): the caller decides
     ("No changes" for upgrade, an error for switch); the ref this run created goes again;
  5. the new image mounted: its logically bound images (pulled into the bootc store **before**
     staging; a failed pull stages nothing), and, when asked, whether a soft reboot is possible;
  6. `systemctl start bootc-unified-finalize-staged.service` (so its stop action finalizes),
     stage (stage.py: state dir, kernel dir, entries.staged, marker last), the origin naming the
     target and the pull path (`[bootc-unified] pull-path`);
  7. GC of both stores (deploy/gc.py), its summary in one line;
  8. soft reboot (/run/nextroot prepared, then `systemctl soft-reboot` with --apply) or, with
     --apply, `systemctl reboot`.
On a booted system /sysroot is read-only: the whole run happens in a private mount namespace
where it is writable (finalize.writable_sysroot). Everything is reported through `say` (one line
each) and progress events; errors are one-line UserErrors.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from bootc_unified import faults
from bootc_unified.cstorage import LayerContentDamaged, Store
from bootc_unified.deploy import bls, kargs, remote, softreboot, sysrootlock
from bootc_unified.deploy.finalize import mounted_image, writable_sysroot
from bootc_unified.deploy.gc import SYSTEM_STORE, UPDATE_STORE_PREFIX, GcOpts, GcReport, gc
from bootc_unified.deploy.install import Undo, fetch, find_kernel, repo_ref_name
from bootc_unified.deploy.lbi import (
    BoundImage,
    PulledImage,
    bound_images_of_dir,
    normalize,
    pull_bound_images,
)
from bootc_unified.deploy.origin import Origin, OursSection, format_imgref
from bootc_unified.deploy.spec import ImageReference
from bootc_unified.deploy.stage import StageResult, booted_entry, stage, upgrade_options
from bootc_unified.deploy.staged import MARKER, StagedMarker
from bootc_unified.deploy.sysroot import MOUNTINFO, Esp, Sysroot, booted_id
from bootc_unified.errors import UserError
from bootc_unified.imgstore import ImageStore, store_path
from bootc_unified.importer import ImportResult, create_image, image_ref_name, import_image
from bootc_unified.progress import NullProgress, Progress, ProgressSteps
from bootc_unified.repository import Repository

FINALIZE_UNIT = "bootc-unified-finalize-staged.service"
SOFT_REBOOT_MODES = ("auto", "required")

Say = Callable[[str], None]


@dataclass(frozen=True)
class SystemOpts:
    """The system an update acts on. Defaults are the booted system's; the hidden flags of
    upgrade/switch point them at a loop-mounted sysroot for tests."""

    sysroot: Path = Path("/sysroot")
    esp: Path | None = None  # None: the mounted ESP (sysroot.default_esp)
    mountinfo: Path = MOUNTINFO
    staged_marker: Path = MARKER
    etc: Path = Path("/etc")  # the live /etc (the merge dry run)
    system_store: Path | None = SYSTEM_STORE
    nextroot: Path = softreboot.NEXTROOT
    systemd: bool = True  # False: no systemctl at all (finalize unit, reboot, soft-reboot)
    tls_verify: bool = True


@dataclass(frozen=True)
class UpdateOpts:
    """How one update runs (upgrade and switch fill it from their flags)."""

    apply: bool = False
    soft_reboot: str | None = None  # "auto" | "required"
    download_only: bool = False
    unified: bool = False  # switch --experimental-unified-storage: the unified path regardless


@dataclass
class Booted:
    sysroot: Sysroot
    esp: Esp
    depl_id: str
    origin: Origin | None  # None: unreadable (origin_error says why); switch still works
    staged: StagedMarker | None
    staged_origin: Origin | None  # the staged deployment's, when one is staged
    origin_error: str = ""

    @property
    def current(self) -> Origin:
        """The deployment an update starts from: the staged one if any, else the booted one."""
        found = self.staged_or_booted
        if found is None:
            raise UserError(f"{self.origin_error} (`switch IMAGE` names the image to follow)")
        return found

    @property
    def staged_or_booted(self) -> Origin | None:
        return self.staged_origin or self.origin


def booted(system: SystemOpts) -> Booted:
    """The booted deployment (its id from mountinfo), its origin, and the staged one's."""
    depl_id = booted_id(system.mountinfo)
    if depl_id is None:
        raise UserError("not booted from a composefs deployment (no composefs:<id> mount on /)")
    if system.esp is None:
        from bootc_unified.deploy.sysroot import default_esp

        esp_path = default_esp(system.mountinfo, system.sysroot)
    else:
        esp_path = system.esp
    sysroot = Sysroot(system.sysroot)
    origin: Origin | None = None
    origin_error = ""
    try:
        origin = Origin.read(sysroot.origin(depl_id))
    except UserError as e:  # garbled or missing: upgrade has nothing to follow, switch goes on
        origin_error = str(e)
    staged = StagedMarker.read_or_none(system.staged_marker)  # a garbled one: replaced
    staged_origin = None
    if staged is not None and sysroot.origin(staged.depl_id).exists():
        staged_origin = Origin.read(sysroot.origin(staged.depl_id))
    return Booted(sysroot, Esp(esp_path), depl_id, origin, staged, staged_origin, origin_error)


def label_of(ref: ImageReference) -> str:
    return str(ref)


# --- 1. the pull path -------------------------------------------------------------------------------


def store_holds(store_root: Path, digests: set[str], names: set[str]) -> bool:
    """Does the containers-storage at `store_root` hold an image with one of these manifest
    digests or names (read from its records, no podman)?"""
    if not (store_root / "overlay-images").is_dir():
        return False
    for rec in Store.open(store_root).images():
        if set(rec.all_digests) & digests or set(rec.names) & names:
            return True
    return False


def store_name(ref: ImageReference) -> str | None:
    """The name an image of `ref` carries in a containers-storage (None: oci layouts)."""
    if ref.transport in ("registry", "containers-storage"):
        return normalize(ref.image)
    return None


def choose_path(
    sysroot: Sysroot, booted_origin: Origin | None, target: ImageReference, force_unified: bool
) -> str:
    if force_unified:
        return "unified"
    refs = [target] if booted_origin is None else [target, booted_origin.imgref]
    names = {n for n in map(store_name, refs) if n}
    digests = set() if booted_origin is None else {booted_origin.image.manifest_digest}
    if store_holds(sysroot.store, digests, names):
        return "unified"
    return "direct"


# --- 2. the remote manifest and the disk-space check -------------------------------------------------


def bytes_needed(repo: Repository, image: remote.RemoteImage) -> int:
    from bootc_unified.importer import layer_content_id

    return sum(x.size for x in image.layers if repo.has_stream(layer_content_id(x.diff_id)) is None)


def check_space(repo: Repository, image: remote.RemoteImage, label: str) -> int:
    needed = bytes_needed(repo, image)
    st = os.statvfs(repo.objects.dir)
    free = st.f_bsize * st.f_bavail
    if needed > free:
        raise UserError(
            f"image {label}: needs {needed} bytes for layers not yet present, "
            f"but {repo.objects.dir} has {free} bytes free"
        )
    return needed


# --- 3. pull and import -----------------------------------------------------------------------------------


@dataclass
class Pulled:
    path: str
    depl_id: str
    manifest_digest: str
    imported: ImportResult
    ref_name: str
    ref_created: bool


def _remove_store(store: ImageStore) -> None:
    store.cleanup_runtime()
    shutil.rmtree(store.root, ignore_errors=True)


def _step(progress: Progress, task: str, description: str, ident: str, done: bool) -> None:
    progress.send(ProgressSteps(task, description, ident, steps=int(done), steps_total=1), True)


def pull_and_import(
    sysroot: Sysroot, target: ImageReference, path: str, tls_verify: bool, progress: Progress, undo: Undo
) -> Pulled:
    label = label_of(target)
    repo = Repository.open(sysroot.repo)
    if path == "unified":
        fetch_store = ImageStore.ensure(sysroot.root)
    else:
        parent = store_path(sysroot.root).parent
        undo.mkdirs(parent)
        fetch_store = ImageStore(Path(tempfile.mkdtemp(prefix=UPDATE_STORE_PREFIX, dir=parent)))
    try:
        if path == "direct":
            fetch_store.podman(["images", "--quiet"])
        image_id = fetch(fetch_store, target, tls_verify, progress)
        cstore = Store.open(fetch_store.root)
        manifest_digest = cstore.image(image_id).manifest_digest
        ref_name = repo_ref_name(manifest_digest)
        ref_created = not (repo.path / "streams/refs" / image_ref_name(ref_name)).is_symlink()
        if ref_created:
            undo.call(lambda: _unref(repo, ref_name))

        def build(repo_: Repository, layers: list[tuple[str, str]]) -> str:
            _step(progress, "erofs", "Building EROFS image", label, False)
            image = create_image(repo_, layers)
            _step(progress, "erofs", "Building EROFS image", label, True)
            return image

        _step(progress, "importing", "Importing layers", label, False)
        try:
            imported = import_image(
                repo, cstore, image_id, zerocopy=path == "unified", build_image=build, name=ref_name
            )
        except LayerContentDamaged as e:
            if path != "unified":
                raise
            # A power cut soon after an earlier pull into the bootc store can leave a layer recorded
            # whole whose files never reached the disk; podman pulls nothing for a layer it has.
            # Drop the image (and so its damaged layers), pull it again, import once more.
            print(f"bootc-unified: warning: {e}; pulling {label} again", file=sys.stderr)
            fetch_store.podman(["rmi", "--force", image_id], check=False)
            fetch_store.repair()
            image_id = fetch(fetch_store, target, tls_verify, progress)
            cstore = Store.open(fetch_store.root)
            imported = import_image(repo, cstore, image_id, zerocopy=True, build_image=build, name=ref_name)
        _step(progress, "importing", "Importing layers", label, True)
    finally:
        if path == "direct":
            _remove_store(fetch_store)
    assert imported.image_id is not None
    return Pulled(path, imported.image_id, manifest_digest, imported, ref_name, ref_created)


def _unref(repo: Repository, name: str) -> None:
    for top in ("streams/refs", "images/refs"):
        (repo.path / top / image_ref_name(name)).unlink(missing_ok=True)


def known_ids(b: Booted) -> set[str]:
    """Deployments in the boot menu, and the staged one: the marker's, when it is whole (its
    entries staged, or already swapped in by a finalize). Staged entries without the marker are an
    update killed before its last step: staged again, not "no changes"."""
    from bootc_unified.deploy.stage import deployed_ids

    ids = deployed_ids(b.esp)
    if b.staged is not None:
        for ef in bls.read_entries(b.esp.entries_staged):
            with contextlib.suppress(UserError):
                if (arg := ef.entry.composefs) is not None and arg.digest == b.staged.depl_id:
                    ids.add(arg.digest)
    return ids | {b.depl_id}


# --- 5. what the new image needs ---------------------------------------------------------------------


@dataclass
class NewImage:
    bound: list[BoundImage]
    soft_reboot_reason: str | None = None  # why not soft-reboot capable (None: capable)
    options: str = ""  # the new entry's options


def inspect_new(b: Booted, new_id: str, label: str, want_soft: bool) -> NewImage:
    """Mount the new image: its bound images; with `want_soft`, the soft-reboot capability."""
    with contextlib.ExitStack() as stack:
        new_root = stack.enter_context(mounted_image(b.sysroot, new_id))
        try:
            bound = bound_images_of_dir(new_root)
        except UserError as e:
            raise UserError(f"image {label}: {str(e).replace(str(new_root), '')}") from e
        out = NewImage(bound)
        if want_soft:
            old_root = stack.enter_context(mounted_image(b.sysroot, b.depl_id))
            _kver, vmlinuz, initramfs = find_kernel(new_root, label)
            try:
                old_kargs, new_kargs = kargs.from_root(old_root), kargs.from_root(new_root)
            except UserError as e:
                text = str(e).replace(str(old_root), "booted image ").replace(str(new_root), "new image ")
                raise UserError(text) from e
            booted_options = booted_entry(b.esp, b.depl_id).entry.options or ""
            out.options = upgrade_options(booted_options, new_id, old_kargs, new_kargs)
            out.soft_reboot_reason = softreboot.incapable_reason(
                b.origin.boot.digest if b.origin else None,
                bls.boot_digest(vmlinuz, initramfs),
                booted_options,
                out.options,
            )
    return out


# --- the whole update ---------------------------------------------------------------------------------


@dataclass
class UpdateResult:
    path: str
    target: ImageReference
    depl_id: str
    unchanged: bool  # the image is already deployed (upgrade: "No changes")
    pulled: Pulled | None = None
    bound: list[PulledImage] = field(default_factory=list)
    staged: StageResult | None = None
    gc: GcReport | None = None


def systemctl(system: SystemOpts, *args: str) -> None:
    """`systemctl ARGS`, skipped when told so or when not booted under systemd."""
    if not system.systemd or not Path("/run/systemd/system").is_dir():
        return
    proc = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"systemctl {' '.join(args)}: {last}")


def gc_summary(report: GcReport) -> str:
    objects, nbytes = report.repo.get("removed_objects", 0), report.repo.get("removed_bytes", 0)
    return (
        f"GC: removed {len(report.removed_deployments)} deployments, "
        f"{len(report.removed_kernel_dirs)} kernel dirs, {len(report.removed_images)} images, "
        f"{objects} repository objects ({nbytes} bytes)"
    )


def import_summary(p: Pulled) -> str:
    imp = p.imported
    methods = ", ".join(
        f"{m.value} {c.objects} ({c.bytes} B)" for m, c in imp.stats.by_method.items() if c.objects
    )
    return (
        f"Imported: {imp.layers_imported} layers new, {imp.layers_present} present; "
        f"objects: {methods or 'none new'}; bytes copied: {imp.stats.copied_bytes}"
    )


def update(
    system: SystemOpts,
    b: Booted,
    target: ImageReference,
    opts: UpdateOpts,
    on_unchanged: Callable[[str], None],
    say: Say,
    progress: Progress | None = None,
) -> UpdateResult:
    """Pull `target` and stage it over booted `b`. `on_unchanged(label)` is called when the image
    is already deployed (it may raise); then nothing is staged. Holds the sysroot lock throughout
    (sysrootlock.py): a second update or a GC waits."""
    with sysrootlock.locked(system.sysroot):
        return _update(system, b, target, opts, on_unchanged, say, progress)


def _update(
    system: SystemOpts,
    b: Booted,
    target: ImageReference,
    opts: UpdateOpts,
    on_unchanged: Callable[[str], None],
    say: Say,
    progress: Progress | None,
) -> UpdateResult:
    progress = progress or NullProgress()
    if opts.soft_reboot not in (None, *SOFT_REBOOT_MODES):
        raise UserError(f"--soft-reboot {opts.soft_reboot}: choose auto or required")
    label = label_of(target)
    path = choose_path(b.sysroot, b.origin, target, opts.unified)
    say(f"Pull path: {path}")
    writable_sysroot(system.sysroot)
    repo = Repository.open(b.sysroot.repo)
    if target.transport == "registry":
        check_space(repo, remote.inspect(target.image, system.tls_verify), label)
    undo = Undo()
    try:
        pulled = pull_and_import(b.sysroot, target, path, system.tls_verify, progress, undo)
        faults.point("update-after-import")
        result = UpdateResult(path, target, pulled.depl_id, False, pulled)
        if pulled.depl_id in known_ids(b):
            result.unchanged = True
            on_unchanged(label)
            if pulled.ref_created:
                undo.run()
            return result
        say(import_summary(pulled))
        new = inspect_new(b, pulled.depl_id, label, opts.soft_reboot is not None)
        if opts.soft_reboot == "required" and new.soft_reboot_reason:
            raise UserError(f"cannot soft-reboot into {label}: {new.soft_reboot_reason}")
        if new.bound:
            store = ImageStore.ensure(b.sysroot.root)
            result.bound = pull_bound_images(store, new.bound, system.tls_verify, progress)
            fetched = sum(1 for p in result.bound if p.pulled)
            say(f"Bound images: {fetched} pulled, {len(result.bound) - fetched} present")
        faults.point("update-before-stage")
        systemctl(system, "start", FINALIZE_UNIT)
        origin = replace(Origin.new(target, None, pulled.manifest_digest), ours=OursSection(pull_path=path))
        result.staged = stage(
            b.sysroot,
            b.esp,
            b.depl_id,
            pulled.depl_id,
            origin,
            current_etc=system.etc,
            download_only=opts.download_only,
            marker=system.staged_marker,
        )
    except BaseException:
        undo.run()
        raise
    undo.commit()
    faults.point("update-after-stage")
    say(f"Queued for next boot: {format_imgref(target)}")
    say(f"  Digest: {pulled.manifest_digest}")
    say(f"  Deployment: {pulled.depl_id}")
    if opts.download_only:
        say("  Download-only: finalization is locked until `upgrade --from-downloaded`")
    try:
        result.gc = gc(
            GcOpts(
                sysroot=system.sysroot,
                esp=b.esp.root,
                mountinfo=system.mountinfo,
                staged_marker=system.staged_marker,
                system_store=system.system_store,
            )
        )
        say(gc_summary(result.gc))
    except UserError as e:
        say(f"GC: failed: {e}")
    after_staging(system, opts, new, label, say)
    return result


def after_staging(system: SystemOpts, opts: UpdateOpts, new: NewImage, label: str, say: Say) -> None:
    """Soft reboot (prepared; performed with --apply), or with --apply a reboot."""
    if opts.soft_reboot is not None:
        if new.soft_reboot_reason is None:
            softreboot.prepare_nextroot(system.sysroot, new.options, system.nextroot)
            say(f"Soft reboot prepared: {system.nextroot}")
            if opts.apply and system.systemd:
                softreboot.soft_reboot()
            return
        say(f"Not soft-rebooting into {label}: {new.soft_reboot_reason}")
    if opts.apply:
        systemctl(system, "reboot")
