"""The bootc-owned containers-storage at <sysroot>/ostree/bootc/storage, driven through podman.

Every podman call runs with this store's own `--root/--runroot --storage-driver overlay` and an
environment pinned to files this module writes (CONTAINERS_STORAGE_CONF, CONTAINERS_REGISTRIES_CONF,
CONTAINERS_CONF, REGISTRY_AUTH_FILE): the user's storage.conf, registries and credentials are never
read, and the host's default storage is never touched (except as the explicit source of
`copy_from_host`).

The store is created atomically: a temporary directory next to it is initialised by podman, the
libpod database (which records the temporary path) is dropped, and the directory is renamed into
place. The runroot lives in /run/bootc-unified/<hash of the store path>/ (podman limits its length).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from bootc_unified import pullprogress
from bootc_unified.errors import UserError, tool_error_line
from bootc_unified.progress import NullProgress, Progress, ProgressSteps, SubTaskStep

STORE_SUBPATH = Path("ostree/bootc/storage")
RUN_BASE = Path("/run/bootc-unified")
PODMAN = "podman"
# Partial pulls (zstd:chunked: only the files the store lacks are fetched) are enabled where podman
# keeps what a bit-exact import needs. Measured: trixie's podman 5.4 stores a partially pulled
# layer with its tar-split (from the TOC) and the config's DiffID; Debian 12's 4.3 keeps neither
# (cstorage.Layer.partial_gaps), so there they stay off. 5.3 is upstream's line, not measured here:
# its containers-storage (1.56) pulls a zstd:chunked layer without tar-split data whole.
PARTIAL_PULLS_SINCE = (5, 3)


class DamagedImage(UserError):
    """The store records the image, but podman cannot read it (see storerepair.py)."""


class PullPolicy(Enum):
    MISSING = "missing"  # pull only if no image of that name is in the store
    ALWAYS = "always"  # always ask the registry (fetches only what changed)


@dataclass(frozen=True)
class StoreImage:
    id: str
    names: tuple[str, ...]
    digest: str
    repo_digests: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "names": list(self.names), "digest": self.digest}

    def keys(self) -> set[str]:
        """Everything a root may name this image by: names, ID (bare and sha256:), digests."""
        return {*self.names, self.id, f"sha256:{self.id}", self.digest, *self.repo_digests} - {""}


def check_qualified(ref: str) -> None:
    """Refuse short names: the store never consults search registries."""
    name = docker_ref(ref)
    if "://" in name or name.startswith(("oci:", "oci-archive:", "dir:", "docker-archive:")):
        return
    first, _, rest = name.partition("/")
    if not rest or not ("." in first or ":" in first or first == "localhost"):
        raise UserError(f"{ref}: not a fully qualified image reference (REGISTRY/REPOSITORY[:TAG|@DIGEST])")


def store_path(sysroot: Path) -> Path:
    return sysroot / STORE_SUBPATH


def docker_ref(ref: str) -> str:
    """podman's spelling of a reference: `docker://` stripped, other transports kept."""
    return ref.removeprefix("docker://")


@functools.cache
def podman_version(podman: str = PODMAN) -> tuple[int, int] | None:
    """(major, minor) of `podman --version`; None when podman does not answer."""
    try:
        out = subprocess.run([podman, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def partial_pulls_supported() -> bool:
    """Whether this machine's podman pulls zstd:chunked layers partially and importably."""
    version = podman_version()
    return version is not None and version >= PARTIAL_PULLS_SINCE


@dataclass
class ImageStore:
    root: Path
    authfile: Path | None = None
    partial_pulls: bool | None = None  # zstd:chunked partial pulls; None: where podman supports them

    # --- opening and creating ----------------------------------------------------------------

    @classmethod
    def open(cls, sysroot: Path, authfile: Path | None = None) -> ImageStore:
        """The existing store under `sysroot`; UserError if there is none."""
        root = store_path(sysroot)
        if not root.is_dir():
            raise UserError(f"{root}: no bootc image store here (pull an image first)")
        return cls(root, authfile)

    @classmethod
    def ensure(cls, sysroot: Path, authfile: Path | None = None) -> ImageStore:
        """Open the store under `sysroot`, creating it atomically if it does not exist."""
        if not sysroot.is_dir():
            raise UserError(f"{sysroot}: sysroot is not a directory")
        root = store_path(sysroot)
        if root.is_dir():
            return cls(root, authfile)
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".storage-", dir=root.parent))
        try:
            init = cls(tmp, authfile)
            init.podman(["images", "--quiet"])
            init.drop_database()
            shutil.rmtree(init.state_dir, ignore_errors=True)
            try:
                tmp.rename(root)
            except OSError:
                if not root.is_dir():  # lost a race to another creator: theirs is as good as ours
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(root, authfile)

    def drop_database(self) -> None:
        """Remove libpod's database (podman 4: libpod/bolt_state.db, podman 5: db.sql): it pins the
        path the store was used at (graph root, static dir), and podman refuses the store at any
        other path ("database configuration mismatch"). containers-storage itself does not, and
        this store holds no containers: call it before the store is seen at another path (a new
        store renamed into place; install's target root, mounted elsewhere at boot)."""
        for database in ("libpod/bolt_state.db", "db.sql"):
            (self.root / database).unlink(missing_ok=True)

    # --- the pinned podman environment ---------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        digest = hashlib.sha256(os.fsencode(self.root.resolve())).hexdigest()[:12]
        return RUN_BASE / digest

    @property
    def runroot(self) -> Path:
        return self.state_dir / "run"

    @property
    def pulls_partially(self) -> bool:
        return partial_pulls_supported() if self.partial_pulls is None else self.partial_pulls

    def storage_conf_text(self) -> str:
        # pull_options survive --storage-driver (which drops the driver's options, see argv).
        # No hard links between layers: a file shared by two layers would share its metadata too.
        partial = "true" if self.pulls_partially else "false"
        return (
            "# written by bootc-unified: the bootc-owned store; nothing else is read\n"
            "[storage]\n"
            'driver = "overlay"\n'
            f"graphroot = {json.dumps(str(self.root))}\n"
            f"runroot = {json.dumps(str(self.runroot))}\n"
            "[storage.options.pull_options]\n"
            f'enable_partial_images = "{partial}"\n'
            'use_hard_links = "false"\n'
            "[storage.options.overlay]\n"
            'skip_mount_home = "true"\n'
        )

    def _write_config(self, insecure: Sequence[str] = ()) -> dict[str, Path]:
        # Every podman run of ours starts without libpod's database: one left by any other podman
        # that looked at this store (another runroot: `podman --root <store> images` by a user)
        # makes ours fail with "database configuration mismatch", and the store has no containers.
        if self.root.is_dir():
            self.drop_database()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        files = {
            "storage": self.state_dir / "storage.conf",
            "registries": self.state_dir
            / ("registries.conf" if not insecure else "registries-insecure.conf"),
            "containers": self.state_dir / "containers.conf",
            "auth": self.state_dir / "auth.json",
        }
        files["storage"].write_text(self.storage_conf_text())
        registries = 'unqualified-search-registries = []\nshort-name-mode = "enforcing"\n'
        for host in insecure:
            registries += f"[[registry]]\nlocation = {json.dumps(host)}\ninsecure = true\n"
        files["registries"].write_text(registries)
        files["containers"].write_text('[engine]\nevents_logger = "none"\n')
        if not files["auth"].exists():
            files["auth"].write_text('{"auths": {}}\n')
        return files

    def env(self, insecure: Sequence[str] = ()) -> dict[str, str]:
        files = self._write_config(insecure)
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("CONTAINERS_", "REGISTRY_AUTH"))}
        return {
            **keep,
            "CONTAINERS_STORAGE_CONF": str(files["storage"]),
            "CONTAINERS_REGISTRIES_CONF": str(files["registries"]),
            "CONTAINERS_CONF": str(files["containers"]),
            "REGISTRY_AUTH_FILE": str(self.authfile or files["auth"]),
        }

    def argv(self, args: Sequence[str]) -> list[str]:
        return [
            PODMAN,
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "overlay",
            # --storage-driver makes podman ignore the storage.conf's options: repeat the one that
            # keeps podman from bind-mounting <root>/overlay (left behind when a command fails).
            "--storage-opt",
            "overlay.skip_mount_home=true",
            *args,
        ]

    def podman(self, args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(args), capture_output=True, text=True, env=self.env())
        if check and proc.returncode != 0:
            raise PodmanError(args, proc.returncode, proc.stderr)
        return proc

    # --- verbs ---------------------------------------------------------------------------------

    def images(self) -> list[StoreImage]:
        out = self.podman(["images", "--format", "json"]).stdout
        return [
            StoreImage(
                id=str(i["Id"]),
                names=tuple(i.get("Names") or ()),
                digest=str(i.get("Digest") or ""),
                repo_digests=tuple(i.get("RepoDigests") or ()),
            )
            for i in json.loads(out or "[]")
        ]

    def exists(self, ref: str) -> bool:
        return self.podman(["image", "exists", docker_ref(ref)], check=False).returncode == 0

    def inspect(self, ref: str) -> StoreImage:
        proc = self.podman(["image", "inspect", "--format", "json", docker_ref(ref)], check=False)
        if proc.returncode != 0:
            why = tool_error_line(proc.stderr)
            if self.exists(ref):  # recorded, yet podman cannot read it
                raise DamagedImage(f"{ref}: damaged in the bootc store ({self.root}): {why}")
            raise UserError(f"{ref}: no such image in the bootc store ({self.root})")
        i = json.loads(proc.stdout)[0]
        return StoreImage(
            id=str(i["Id"]),
            names=tuple(i.get("RepoTags") or ()),
            digest=str(i.get("Digest") or ""),
            repo_digests=tuple(i.get("RepoDigests") or ()),
        )

    def pull(
        self,
        ref: str,
        policy: PullPolicy = PullPolicy.MISSING,
        tls_verify: bool = True,
        progress: Progress | None = None,
    ) -> StoreImage:
        """Pull `ref` into the store; with MISSING, an image already present is not fetched again."""
        progress = progress or NullProgress()
        check_qualified(ref)
        try:
            return self._pull(ref, policy, tls_verify, progress)
        except DamagedImage:  # what a power cut after an earlier pull left: repair, pull once more
            self.repair()
            return self._pull(ref, PullPolicy.ALWAYS, tls_verify, progress)

    def _pull(self, ref: str, policy: PullPolicy, tls_verify: bool, progress: Progress) -> StoreImage:
        if policy is PullPolicy.MISSING and self.exists(ref):
            image = self.inspect(ref)
            progress.send(
                ProgressSteps("pulling", "Pulling", ref, steps_cached=1, steps=1, steps_total=1), True
            )
            return image
        try:
            image_id = pullprogress.pull(self, ref, tls_verify=tls_verify, progress=progress)
        except UserError as e:
            if "no space left on device" in str(e).lower():  # podman names the image, not the store
                raise UserError(f"{self.root}: {e}") from e
            raise
        os.sync()  # what podman wrote is on disk before anything is built on it
        return self.inspect(image_id)

    def tag_unless_taken(self, image_id: str, name: str) -> str | None:
        """Tag `name` on the image unless it names a digest or another image holds it already;
        returns the tag given (or already there), None when none was."""
        if "@" in name:
            return None
        tagged = name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
        for image in self.images():
            if tagged in image.names:
                return tagged if image.id == image_id else None
        self.podman(["tag", image_id, tagged])
        return tagged

    def repair(self) -> list[str]:
        """Repair the store after a power cut (storerepair.py; `podman system check --repair`
        where podman has it); returns what was rewritten."""
        from bootc_unified.storerepair import repair_links

        fixed = repair_links(self.root)
        version = podman_version()
        if version is not None and version >= (5, 0):
            self.podman(["system", "check", "--repair", "--force"], check=False)
        return fixed

    def pull_plain(self, ref: str, tls_verify: bool, progress: Progress) -> str:
        """`podman pull`, reporting one step per blob podman announces; returns the image ID."""
        # No --tls-verify=true: an explicit flag overrides a registries.conf `insecure = true`.
        argv = ["pull", *([] if tls_verify else ["--tls-verify=false"]), docker_ref(ref)]
        proc = subprocess.Popen(
            self.argv(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env()
        )
        assert proc.stderr is not None and proc.stdout is not None
        blobs: list[str] = []
        stderr_lines = []
        for line in proc.stderr:
            stderr_lines.append(line)
            if line.startswith("Copying blob "):
                blobs.append(line.split()[2])
                subtasks = [
                    SubTaskStep("layer", "Layer", b, completed=n < len(blobs) - 1)
                    for n, b in enumerate(blobs)
                ]
                progress.send(
                    ProgressSteps(
                        "pulling",
                        "Pulling",
                        ref,
                        steps=len(blobs) - 1,
                        steps_total=len(blobs),
                        subtasks=subtasks,
                    )
                )
        out = proc.stdout.read()
        if proc.wait() != 0:
            raise PodmanError(argv, proc.returncode, "".join(stderr_lines), what=ref)
        subtasks = [SubTaskStep("layer", "Layer", b, completed=True) for b in blobs]
        progress.send(
            ProgressSteps(
                "pulling", "Pulling", ref, steps=len(blobs), steps_total=len(blobs), subtasks=subtasks
            ),
            True,
        )
        return out.strip().splitlines()[-1]

    def remove(self, ref: str) -> StoreImage:
        image = self.inspect(ref)
        target = docker_ref(ref)
        # By name: untag (and delete when it was the last name). By ID or digest: delete.
        self.podman(["rmi", *(["--force"] if target in image.keys() - set(image.names) else []), target])
        return image

    def prune_except_roots(self, roots: Iterable[str]) -> list[StoreImage]:
        """Remove every image none of whose names, IDs or digests is in `roots`; return them.

        A root that names no image is not an error (the deployment may refer to a removed tag).
        """
        wanted = {docker_ref(r) for r in roots}
        victims = [img for img in self.images() if not (img.keys() & wanted)]
        if victims:
            self.podman(["rmi", "--force", *(img.id for img in victims)])
        return victims

    def copy_from_host(
        self,
        image: str,
        source_root: Path | None = None,
        source_runroot: Path | None = None,
        source_env: dict[str, str] | None = None,
    ) -> StoreImage:
        """Copy `image` from a podman storage (default: the host's) into this store, by podman push.

        The source is read with the caller's podman configuration (`source_env`, default the
        current environment); the destination is spelled out completely in the reference.
        """
        self._write_config()
        dest = f"containers-storage:[overlay@{self.root}+{self.runroot}:overlay.skip_mount_home=true]{image}"
        argv = [PODMAN]
        if source_root is not None:
            argv += ["--root", str(source_root)]
        if source_runroot is not None:
            argv += ["--runroot", str(source_runroot)]
        argv += ["image", "push", "--quiet", image, dest]
        proc = subprocess.run(argv, capture_output=True, text=True, env=source_env)
        if proc.returncode != 0:
            raise UserError(
                f"cannot copy {image} from host storage into {self.root}: {tool_error_line(proc.stderr)}"
            )
        return self.inspect(image)

    def dropin_text(self) -> str:
        """A storage.conf fragment that makes this store an additional image store for podman."""
        return (
            "# bootc-unified: the images in the bootc-owned store are visible (read-only) to podman\n"
            "[storage.options]\n"
            f"additionalimagestores = [{json.dumps(str(self.root))}]\n"
        )

    def write_dropin(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.dropin_text())
        tmp.rename(path)

    def cleanup_runtime(self) -> None:
        """Unmount anything podman left under the store or its runroot and drop the runroot."""
        for base in (self.root, self.state_dir):
            prefix = str(base.resolve())
            with open("/proc/self/mounts") as f:
                points = [line.split()[1] for line in f]
            for point in sorted(
                (p for p in points if p == prefix or p.startswith(prefix + "/")), reverse=True
            ):
                subprocess.run(["umount", point], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.state_dir)


def pull_into(
    sysroot: Path,
    ref: str,
    policy: PullPolicy = PullPolicy.MISSING,
    tls_verify: bool = True,
    progress: Progress | None = None,
    authfile: Path | None = None,
) -> StoreImage:
    """Pull into the store under `sysroot`, creating it first if needed; a failed pull into a store
    this call created removes it again, so bad input leaves nothing behind."""
    created = not store_path(sysroot).is_dir()
    store = ImageStore.ensure(sysroot, authfile)
    try:
        return store.pull(ref, policy, tls_verify, progress)
    except BaseException:
        if created:
            store.cleanup_runtime()
            shutil.rmtree(store.root, ignore_errors=True)
        raise


class PodmanError(UserError):
    def __init__(self, args: Sequence[str], returncode: int, stderr: str, what: str | None = None) -> None:
        self.args_ = list(args)
        self.returncode = returncode
        self.stderr = stderr
        subject = what or " ".join(args[:2])
        super().__init__(f"{subject}: {tool_error_line(stderr)}")
