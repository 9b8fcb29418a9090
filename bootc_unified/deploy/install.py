"""`install to-filesystem ROOT --boot-esp ESP`: the first deployment onto a mounted root and ESP.

In order (bootc `install.rs` composefs branch, reference/deployments.md section 11):
  1. check: sources parse, verity (without --allow-missing-verity a filesystem that cannot enable
     fs-verity stops here), systemd-boot's EFI binary is at hand;
  2. ROOT/composefs: the repository (SHA-512; `--allow-missing-verity` makes it insecure) and
     ROOT/ostree/bootc/storage: the bootc-owned containers-storage, always created (podman refuses
     a storage.conf naming a missing additional image store);
  3. fetch the source image into a containers-storage on ROOT's filesystem: the bootc store itself
     (--experimental-unified-storage), else a temporary store beside it that is deleted after the
     import (objects reflinked/hardlinked from it keep their data; only the store's names go);
  4. import zero-copy (reflink, else hardlink; the temporary store may fall back to copies), build
     the EROFS image; its id is the deployment id; the ref `localhost/bootc-<manifest digest>`;
  5. from the image (mounted): its logically bound images into the bootc store (from the host's
     store when there, else pulled; a failure installs nothing); kernel + initramfs
     (`usr/lib/modules/<kver>/`), os-release, kargs.d; then kernel dir, state dir (+ /var seed),
     systemd-boot, and last the BLS entry.
On any failure everything this run created is removed again (entry, state, kernel dir, /var seed,
ref, and the repository and store when this run made them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from bootc_unified import verity
from bootc_unified.boot.cmdline import ComposefsArg, join_cmdline
from bootc_unified.cstorage import Store
from bootc_unified.deploy import bls, kargs, state
from bootc_unified.deploy.lbi import bound_images_of_dir
from bootc_unified.deploy.origin import Origin, parse_imgref
from bootc_unified.deploy.osrelease import OsRelease
from bootc_unified.deploy.spec import ImageReference
from bootc_unified.deploy.sysroot import VERITY_FILESYSTEMS, Esp, Sysroot, fs_type, fs_uuid
from bootc_unified.errors import UserError
from bootc_unified.imgstore import ImageStore, PullPolicy, store_path
from bootc_unified.importer import ImportResult, create_image, image_ref_name, import_image
from bootc_unified.progress import NullProgress, Progress, ProgressSteps
from bootc_unified.repository import Repository
from bootc_unified.verity import HashAlg

CONTAINERENV = Path("/run/.containerenv")
SYSTEMD_BOOT = Path("usr/lib/systemd/boot/efi/systemd-bootx64.efi")
EFI_TARGETS = (Path("EFI/BOOT/BOOTX64.EFI"), Path("EFI/systemd/systemd-bootx64.efi"))
LOADER_CONF = "timeout 5\n"  # bootc's
MOUNT_BASE = Path("/run/bootc-unified")


@dataclass(frozen=True)
class InstallToFilesystemOpts:  # bootc cli.rs InstallToFilesystemOpts (the flags we take)
    root: Path
    boot_esp: Path
    karg: tuple[str, ...] = ()
    source_imgref: str | None = None
    target_imgref: str | None = None
    target_transport: str = "registry"
    experimental_unified_storage: bool = False
    allow_missing_verity: bool = False
    tls_verify: bool = True
    progress_fd: int | None = None


@dataclass
class InstallResult:
    image: str  # the source reference
    target: ImageReference
    deployment: str  # the deployment id (EROFS image fs-verity digest)
    unified: bool
    entry: Path
    kernel_dir: Path
    kernel_shared: bool
    import_result: ImportResult
    store_image_id: str
    bound_images: list[str] = field(default_factory=list)  # one line each: where it came from
    extra: dict[str, object] = field(default_factory=dict)

    def summary(self) -> str:
        stats = self.import_result.stats
        methods = ", ".join(
            f"{m.value} {c.objects} ({c.bytes} B)" for m, c in stats.by_method.items() if c.objects
        )
        return (
            f"Installed {self.image}\n"
            f"  deployment: {self.deployment}\n"
            f"  target: {self.target}\n"
            f"  storage: {'unified (kept in ostree/bootc/storage)' if self.unified else 'not unified'}\n"
            f"  objects: {methods or 'none new'}; bytes copied: {stats.copied_bytes}\n"
            f"  entry: {self.entry.name}; kernel: {self.kernel_dir.name}"
            f"{' (shared)' if self.kernel_shared else ''}\n"
            + "".join(f"  bound image {line}\n" for line in self.bound_images)
        )


# --- sources ------------------------------------------------------------------------------------


def container_image(containerenv: Path = CONTAINERENV) -> str:
    """`image="..."` from /run/.containerenv (the image of the container we run in), as bootc does."""
    try:
        text = containerenv.read_text()
    except OSError as e:
        raise UserError(
            f"no --source-imgref given and {containerenv} is not readable ({e.strerror}): "
            "not running in a podman container"
        ) from e
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "image":
            image = value.strip().strip('"')
            if image:
                return image
    raise UserError(f"no --source-imgref given and {containerenv} names no image")


def source_ref(opts: InstallToFilesystemOpts, containerenv: Path = CONTAINERENV) -> ImageReference:
    text = opts.source_imgref or f"containers-storage:{container_image(containerenv)}"
    return parse_imgref(text, "--source-imgref")


def target_ref(opts: InstallToFilesystemOpts, source: ImageReference) -> ImageReference:
    if opts.target_imgref is None:
        # bootc: the source's name under --target-transport (default registry), e.g. an install
        # from the container's own image (containers-storage) upgrades from the registry later.
        return ImageReference(source.image, opts.target_transport)
    text = opts.target_imgref
    if "://" in text or text.startswith(("containers-storage:", "oci:")):
        return parse_imgref(text, "--target-imgref")
    return ImageReference(text, opts.target_transport)


def repo_ref_name(manifest_digest: str) -> str:
    """The repository's name for a deployment's image (bootc: `localhost/bootc-<digest>`)."""
    return f"localhost/bootc-{manifest_digest}"


HOST_STORAGE = Path("/var/lib/containers/storage")
BLOB_INFO_CACHE = Path("/var/lib/containers/cache")  # containers/image's, for root
BLOB_INFO_CACHE_FILES = ("blob-info-cache-v1.sqlite", "blob-info-cache-v1.boltdb")


def host_storage_env(graphroot: Path) -> dict[str, str]:
    """podman's environment for reading the host's store: a storage.conf naming only that store.

    The image's own /etc/containers/storage.conf may list the bootc store as an additional image
    store (/usr/lib/bootc/storage -> /sysroot/...), which does not exist inside an install
    container, and podman refuses to run with a missing additional store.
    """
    conf = Path("/run/bootc-unified/host-storage.conf")
    conf.parent.mkdir(parents=True, exist_ok=True)
    text = f'[storage]\ndriver = "overlay"\ngraphroot = "{graphroot}"\nrunroot = "/run/containers/storage"\n'
    tmp = conf.with_name(f".{conf.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, conf)
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf)}


def fetch(store: ImageStore, source: ImageReference, tls_verify: bool, progress: Progress) -> str:
    """Put the source image into `store`; returns its image ID there."""
    if source.transport == "registry":
        return store.pull(f"docker://{source.image}", PullPolicy.ALWAYS, tls_verify, progress).id
    if source.transport == "containers-storage":
        progress.send(
            ProgressSteps("copying", "Copying from host storage", source.image, steps_total=1), True
        )
        image = store.copy_from_host(
            source.image, source_root=HOST_STORAGE, source_env=host_storage_env(HOST_STORAGE)
        )
        progress.send(
            ProgressSteps("copying", "Copying from host storage", source.image, steps=1, steps_total=1), True
        )
        return image.id
    ref = f"{source.transport}:{source.image}"
    if source.transport == "oci" and not Path(source.image.split(":")[0]).is_dir():
        raise UserError(f"{ref}: no such OCI layout directory")
    return store.inspect(store.pull_plain(ref, tls_verify, progress)).id


# --- the image's boot resources ---------------------------------------------------------------------


@dataclass(frozen=True)
class BootResources:
    kver: str
    vmlinuz: Path
    initramfs: Path
    os_release: OsRelease
    kargs: tuple[str, ...]
    systemd_boot: Path


def find_kernel(image_root: Path, label: str) -> tuple[str, Path, Path]:
    modules = image_root / "usr/lib/modules"
    kvers = sorted(p.name for p in modules.iterdir() if (p / "vmlinuz").is_file()) if modules.is_dir() else []
    if not kvers:
        raise UserError(f"image {label} has no kernel (no usr/lib/modules/<kver>/vmlinuz)")
    if len(kvers) > 1:
        raise UserError(f"image {label} has more than one kernel: {', '.join(kvers)}")
    kver = kvers[0]
    initramfs = modules / kver / "initramfs.img"
    if not initramfs.is_file():
        raise UserError(f"image {label} has no initramfs (usr/lib/modules/{kver}/initramfs.img)")
    return kver, modules / kver / "vmlinuz", initramfs


def boot_resources(image_root: Path, label: str) -> BootResources:
    kver, vmlinuz, initramfs = find_kernel(image_root, label)
    try:
        image_kargs = kargs.from_root(image_root)
    except UserError as e:
        raise UserError(f"image {label}: {str(e).replace(str(image_root), '')}") from e
    sdboot = image_root / SYSTEMD_BOOT
    if not sdboot.is_file():
        sdboot = Path("/") / SYSTEMD_BOOT
        if not sdboot.is_file():
            raise UserError(
                f"no systemd-boot EFI binary: neither image {label} nor this host has /{SYSTEMD_BOOT} "
                "(Debian package systemd-boot-efi)"
            )
    return BootResources(
        kver, vmlinuz, initramfs, OsRelease.from_root(image_root), tuple(image_kargs), sdboot
    )


def entry_options(
    root_uuid: str | None, user_kargs: tuple[str, ...], image_kargs: tuple[str, ...], arg: ComposefsArg
) -> str:
    """bootc's install order: root kargs, --karg..., composefs=, then kargs.d."""
    root = [f"root=UUID={root_uuid}"] if root_uuid else []
    return join_cmdline([*root, "rw", *user_kargs, str(arg), *image_kargs])


# --- undo on failure ----------------------------------------------------------------------------------


class Undo:
    """What this run created, removed again (newest first) unless `commit()` was called."""

    def __init__(self) -> None:
        self._actions: list[Callable[[], None]] = []

    def path(self, path: Path) -> None:
        def remove() -> None:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

        self._actions.append(remove)

    def mkdirs(self, directory: Path) -> None:
        """mkdir -p, remembering the topmost directory it created."""
        missing = [p for p in (directory, *directory.parents) if not p.exists()]
        if missing:
            self.path(missing[-1])
            directory.mkdir(parents=True, exist_ok=True)

    def call(self, action: Callable[[], None]) -> None:
        self._actions.append(action)

    def commit(self) -> None:
        self._actions.clear()

    def run(self) -> None:
        for action in reversed(self._actions):
            with contextlib.suppress(Exception):
                action()
        self._actions.clear()


def _remove_store(store: ImageStore) -> None:
    store.cleanup_runtime()
    shutil.rmtree(store.root, ignore_errors=True)


@contextlib.contextmanager
def _scratch_dir(prefix: str) -> Iterator[Path]:
    MOUNT_BASE.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=MOUNT_BASE))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _step(progress: Progress, task: str, description: str, ident: str, done: bool) -> None:
    progress.send(ProgressSteps(task, description, ident, steps=int(done), steps_total=1), True)


# --- the verb ---------------------------------------------------------------------------------------


def check_target(opts: InstallToFilesystemOpts) -> tuple[Path, Path]:
    root = Path(os.path.abspath(opts.root))
    esp = Path(os.path.abspath(opts.boot_esp))
    if not root.is_dir():
        raise UserError(f"{root}: root is not a directory")
    if not esp.is_dir():
        raise UserError(f"{esp}: --boot-esp is not a directory")
    if not opts.allow_missing_verity:
        support = verity.probe(root)
        if not support.supported:
            raise UserError(f"{root}: {support.reason}; pass --allow-missing-verity to install without it")
    return root, esp


def install_to_filesystem(
    opts: InstallToFilesystemOpts,
    progress: Progress | None = None,
    containerenv: Path = CONTAINERENV,
) -> InstallResult:
    progress = progress or NullProgress()
    if not opts.allow_missing_verity and fs_type(Path(opts.root)) not in VERITY_FILESYSTEMS:
        # bootc's rule: verity is expected on ext4 and btrfs only; elsewhere (XFS) it is optional
        # and the entry says composefs=?<id>.
        opts = replace(opts, allow_missing_verity=True)
    root, esp_path = check_target(opts)
    source = source_ref(opts, containerenv)
    target = target_ref(opts, source)
    for k in opts.karg:
        if not k.strip():
            raise UserError("--karg: empty kernel argument")
    sysroot, esp = Sysroot(root), Esp(esp_path)
    undo = Undo()
    try:
        result = _install(opts, sysroot, esp, source, target, undo, progress)
    except BaseException:
        undo.run()
        raise
    undo.commit()
    return result


def _install(
    opts: InstallToFilesystemOpts,
    sysroot: Sysroot,
    esp: Esp,
    source: ImageReference,
    target: ImageReference,
    undo: Undo,
    progress: Progress,
) -> InstallResult:
    label = f"{source.transport}:{source.image}" if source.transport != "registry" else source.image
    # 2. repository and bootc store
    if (sysroot.repo / "meta.json").exists():
        repo = Repository.open(sysroot.repo)
        if repo.insecure and not opts.allow_missing_verity:
            raise UserError(f"{repo.path}: repository has no fs-verity; pass --allow-missing-verity")
    else:
        undo.path(sysroot.repo)
        repo = Repository.init(sysroot.repo, HashAlg.SHA512, insecure=opts.allow_missing_verity)
    os.chmod(repo.path, 0o700)
    if not (sysroot.root / "ostree").exists():
        undo.path(sysroot.root / "ostree")
    elif not store_path(sysroot.root).exists():
        undo.call(lambda: _remove_store(ImageStore(store_path(sysroot.root))))
    bootc_store = ImageStore.ensure(sysroot.root)

    # 3. fetch into a store on ROOT's filesystem
    if opts.experimental_unified_storage:
        fetch_store = bootc_store
    else:
        tmp_root = Path(tempfile.mkdtemp(prefix=".install-storage-", dir=bootc_store.root.parent))
        fetch_store = ImageStore(tmp_root)
        undo.call(lambda: _remove_store(fetch_store))
        fetch_store.podman(["images", "--quiet"])
    try:
        image_id = fetch(fetch_store, source, opts.tls_verify, progress)

        # 4. import and EROFS image
        def build(repo_: Repository, layers: list[tuple[str, str]]) -> str:
            _step(progress, "erofs", "Building EROFS image", label, False)
            image = create_image(repo_, layers)
            _step(progress, "erofs", "Building EROFS image", label, True)
            return image

        cstore = Store.open(fetch_store.root)
        manifest_digest = cstore.image(image_id).manifest_digest
        ref_name = repo_ref_name(manifest_digest)
        ref_link = repo.path / "streams" / "refs" / image_ref_name(ref_name)
        if not ref_link.is_symlink():
            undo.call(lambda: _unref(repo, ref_name))
        _step(progress, "importing", "Importing layers", label, False)
        imported = import_image(
            repo,
            cstore,
            image_id,
            zerocopy=opts.experimental_unified_storage,
            build_image=build,
            name=ref_name,
        )
        _step(progress, "importing", "Importing layers", label, True)
    finally:
        if fetch_store is not bootc_store:
            _remove_store(fetch_store)
        else:  # the booted system sees the store at /sysroot/..., not at this mount point
            bootc_store.drop_database()
    depl_id = imported.image_id
    assert depl_id is not None
    if sysroot.deployment(depl_id).exists():
        raise UserError(f"image {label} is already deployed here as {depl_id}")

    # 5. boot resources from the mounted image, then the writes
    arg = ComposefsArg(depl_id, insecure=opts.allow_missing_verity or repo.insecure)
    from bootc_unified.erofs.mount import mounted

    with _scratch_dir("install-") as scratch:
        mnt = scratch / "image"
        mnt.mkdir()
        with mounted(repo.image_path(depl_id), repo.objects.dir, mnt, "off" if repo.insecure else "require"):
            res = boot_resources(mnt, label)
            bound = install_bound_images(bootc_store, mnt, opts.tls_verify, progress)
            version = res.os_release.version(depl_id)
            entry_name = bls.file_name(res.os_release.os_id, version, bls.PRIMARY)
            if (esp.entries / entry_name).exists():
                raise UserError(f"{esp.entries / entry_name}: a boot entry of that name exists already")
            kdir = bls.install_kernel(esp, depl_id, res.vmlinuz, res.initramfs)
            if kdir.created:
                undo.path(kdir.path)
            origin = Origin.new(target, kdir.digest, imported.manifest_digest)
            undo.path(sysroot.deployment(depl_id))
            state.write_deployment(sysroot, depl_id, mnt, origin)
            if not sysroot.shared_var.exists():
                undo.path(sysroot.shared_var)
            state.seed_var(sysroot, mnt)
            if source.transport == "containers-storage":
                carry_blob_info_cache(sysroot.shared_var)
            _install_systemd_boot(esp, res.systemd_boot, undo)
            entry = bls.BlsEntry(
                title=res.os_release.title(depl_id),
                version=version,
                linux=kdir.linux,
                initrd=(kdir.initrd,),
                options=entry_options(fs_uuid(sysroot.root), opts.karg, res.kargs, arg),
                sort_key=bls.sort_key(res.os_release.os_id, primary=True),
            )
            undo.mkdirs(esp.entries)
            undo.path(esp.entries / entry_name)
            path = bls.write_entry(esp.entries, entry_name, entry)
    return InstallResult(
        image=label,
        target=target,
        deployment=depl_id,
        unified=opts.experimental_unified_storage,
        entry=path,
        kernel_dir=kdir.path,
        kernel_shared=kdir.shared,
        import_result=imported,
        store_image_id=image_id,
        bound_images=bound,
    )


def install_bound_images(
    store: ImageStore, image_root: Path, tls_verify: bool, progress: Progress
) -> list[str]:
    """The image's logically bound images into the bootc store before anything boots from it
    (bootc's composefs install skips them). Each comes from the host's containers-storage when it
    is there (bootc's `--bound-images stored`: no network needed), else from its registry. Returns
    one line per image saying where it came from."""
    lines = []
    for bound in bound_images_of_dir(image_root):
        where = f"bound image {bound.image} ({bound.file})"
        if store.exists(bound.name):
            lines.append(f"{bound.name}: already in the bootc store")
            continue
        env = host_storage_env(HOST_STORAGE)
        present = HOST_STORAGE.is_dir() and (
            subprocess.run(
                ["podman", "--root", str(HOST_STORAGE), "image", "exists", bound.name],
                env=env,
                capture_output=True,
            ).returncode
            == 0
        )
        try:
            if present:
                store.copy_from_host(bound.name, source_root=HOST_STORAGE, source_env=env)
                lines.append(f"{bound.name}: copied from host storage")
            else:
                store.pull(bound.name, PullPolicy.MISSING, tls_verify, progress)
                lines.append(f"{bound.name}: pulled")
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    return lines


def carry_blob_info_cache(var: Path, source: Path = BLOB_INFO_CACHE) -> list[Path]:
    """The installer's blob-info cache into the installed system's /var, when it has none yet.

    An image copied from the host's store into the bootc store keeps only its layers' uncompressed
    digests; the registry's compressed (gzip/zstd) blob digests live in containers/image's
    blob-info cache of the podman that pulled it (root: /var/lib/containers/cache). Without that
    mapping the installed system's first upgrade cannot tell that the registry's blobs are layers
    it already has and downloads every one again (podman then dedups them on disk). SQLite
    (podman >= 4.6) is copied with SQLite's backup API (consistent even with a WAL), BoltDB as is.
    """
    dest = var / BLOB_INFO_CACHE.relative_to("/var")
    copied = []
    for name in BLOB_INFO_CACHE_FILES:
        src, dst = source / name, dest / name
        if not src.is_file() or dst.exists():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{name}.{os.getpid()}")
        try:
            if name.endswith(".sqlite"):
                with (
                    contextlib.closing(sqlite3.connect(f"file:{src}?mode=ro", uri=True)) as a,
                    contextlib.closing(sqlite3.connect(tmp)) as b,
                ):
                    a.backup(b)
            else:
                shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o600)
            os.rename(tmp, dst)
        except (OSError, sqlite3.Error) as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"{src}: cannot copy the blob-info cache into the target: {e}") from e
        copied.append(dst)
    return copied


def _unref(repo: Repository, name: str) -> None:
    for top in ("streams/refs", "images/refs"):
        (repo.path / top / image_ref_name(name)).unlink(missing_ok=True)


def _install_systemd_boot(esp: Esp, binary: Path, undo: Undo) -> None:
    """systemd-boot as the removable-media default and under EFI/systemd; loader.conf if absent."""
    for rel in EFI_TARGETS:
        dest = esp.root / rel
        if dest.exists():
            continue
        undo.mkdirs(dest.parent)
        undo.path(dest)
        shutil.copyfile(binary, dest)
    if not esp.loader_conf.exists():
        undo.mkdirs(esp.loader_conf.parent)
        undo.path(esp.loader_conf)
        esp.loader_conf.write_text(LOADER_CONF)
