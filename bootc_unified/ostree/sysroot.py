"""An ostree sysroot as bootc's ostree backend keeps it, offline: made with `ostree admin init-fs`
and `os-init`, the image imported zero-copy into its repository (`<sysroot>/ostree/repo`, importer.py)
and deployed with `ostree admin deploy --sysroot`, which checks the commit out as hardlinks to the
repository's objects and writes the BLS entry under `<sysroot>/boot/loader/entries`.

The deployment's origin is bootc's: `[origin] container-image-reference=ostree-unverified-registry:
NAME` (`ostree-unverified-image:TRANSPORT:NAME` for other transports). The deployments are read
back the way the boot loader sees them: each BLS entry's `ostree=/ostree/boot.N/OS/BOOTCSUM/I`
karg, a symlink to `ostree/deploy/OS/deploy/CHECKSUM.SERIAL`, in entry order (ostree gives the
default the highest `version`). A staged deployment (booted systems only, /run/ostree) is not seen.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bootc_unified.cstorage import Store
from bootc_unified.deploy import sysrootlock
from bootc_unified.errors import UserError

from .importer import IMAGE_PREFIX, OstreeImportResult, image_ref, import_image
from .repo import OstreeRepo, run_ostree

DEFAULT_OS = "default"
UNVERIFIED_REGISTRY = "ostree-unverified-registry:"
UNVERIFIED_IMAGE = "ostree-unverified-image:"
# ostree-ext's other signature-verification prefixes: `ostree-remote-image:REMOTE:` and friends
_SIGNED = re.compile(r"^(ostree-remote-image|ostree-remote-registry|ostree-image-signed):([^:]+:)?")
_OSNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def origin_reference(imgref: str) -> str:
    """bootc's `container-image-reference` for an ostree-ext image reference (`registry:NAME`)."""
    if imgref.startswith("registry:"):
        return UNVERIFIED_REGISTRY + imgref.removeprefix("registry:")
    return UNVERIFIED_IMAGE + imgref


def imgref_of_origin(reference: str) -> str:
    """The ostree-ext image reference (`TRANSPORT:NAME`) of a `container-image-reference`."""
    if reference.startswith(UNVERIFIED_REGISTRY):
        return "registry:" + reference.removeprefix(UNVERIFIED_REGISTRY)
    if reference.startswith(UNVERIFIED_IMAGE):
        return reference.removeprefix(UNVERIFIED_IMAGE)
    m = _SIGNED.match(reference)
    if m is not None and m.group(1) == "ostree-remote-registry":
        return "registry:" + reference[m.end() :]
    if m is not None:
        return reference[m.end() :]
    raise UserError(f"container-image-reference {reference!r}: no known signature-verification prefix")


def origin_text(imgref: str) -> str:
    return f"[origin]\ncontainer-image-reference={origin_reference(imgref)}\n"


@dataclass(frozen=True)
class Deployment:
    osname: str
    checksum: str  # the commit
    serial: int
    path: Path  # <sysroot>/ostree/deploy/OS/deploy/CHECKSUM.SERIAL
    entry: Path  # its BLS entry
    imgref: str | None  # from the origin's container-image-reference (None: not a container origin)

    @property
    def origin(self) -> Path:
        return self.path.with_name(self.path.name + ".origin")

    @property
    def image_ref(self) -> str | None:
        """The `ostree/container/image/...` ref of its image."""
        return image_ref(self.imgref) if self.imgref is not None else None

    def to_json(self) -> dict[str, object]:
        return {
            "osname": self.osname,
            "checksum": self.checksum,
            "serial": self.serial,
            "path": str(self.path),
            "entry": str(self.entry),
            "imgref": self.imgref,
        }


class OstreeSysroot:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.repo_path = self.root / "ostree/repo"
        self.boot = self.root / "boot"

    @property
    def repo(self) -> OstreeRepo:
        return OstreeRepo.open(self.repo_path)

    def init(self, osname: str) -> None:
        """`ostree admin init-fs --modern` (when there is no repository yet) and `os-init`."""
        check_osname(osname)
        if not (self.repo_path / "config").is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            run_ostree("admin", "init-fs", "--modern", self.root, what=str(self.root))
        if not (self.root / "ostree/deploy" / osname).is_dir():
            run_ostree("admin", "os-init", f"--sysroot={self.root}", osname, what=str(self.root))

    def deploy(
        self,
        store: Store,
        image: str,
        imgref: str | None = None,
        osname: str = DEFAULT_OS,
        kargs: tuple[str, ...] = (),
    ) -> tuple[Deployment, OstreeImportResult]:
        """Import `image` from `store` zero-copy and deploy its commit as the new default (under
        the sysroot lock, deploy/sysrootlock.py)."""
        self.init(osname)
        with sysrootlock.locked(self.root):
            return self._deploy(store, image, imgref, osname, kargs)

    def _deploy(
        self, store: Store, image: str, imgref: str | None, osname: str, kargs: tuple[str, ...]
    ) -> tuple[Deployment, OstreeImportResult]:
        repo = self.repo
        before = set(repo.refs(IMAGE_PREFIX))
        result = import_image(repo, store, image, imgref=imgref)
        try:
            self._admin_deploy(result, osname, kargs)
        except BaseException:
            # a failed `admin deploy` leaves its checkout; `admin cleanup` removes what no entry boots
            with contextlib.suppress(UserError):
                run_ostree("admin", "cleanup", f"--sysroot={self.root}", what=str(self.root))
            if result.ref not in before:  # the image ref this run made goes again; prune drops the rest
                run_ostree("refs", f"--repo={repo.path}", "--delete", result.ref, what=str(repo.path))
            raise
        deployments = self.deployments()
        if not deployments or deployments[0].checksum != result.commit:
            raise UserError(f"{self.root}: ostree admin deploy did not make {result.commit} the default")
        return deployments[0], result

    def _admin_deploy(self, result: OstreeImportResult, osname: str, kargs: tuple[str, ...]) -> None:
        with tempfile.NamedTemporaryFile(
            "w", dir=self.root / "ostree", prefix=".origin-", suffix=".tmp"
        ) as f:
            f.write(origin_text(result.imgref))
            f.flush()
            run_ostree(
                "admin",
                "deploy",
                f"--sysroot={self.root}",
                f"--os={osname}",
                f"--origin-file={f.name}",
                *(f"--karg={k}" for k in kargs),
                result.commit,
                what=f"deploying {result.imgref}",
            )

    def deployments(self) -> list[Deployment]:
        """Every deployment a BLS entry boots, the default first."""
        entries_dir = self.boot / "loader/entries"
        if not entries_dir.is_dir():
            return []
        entries = []
        for entry in entries_dir.glob("*.conf"):
            fields = _bls_fields(entry)
            version = fields.get("version", "0")
            entries.append((int(version) if version.isdigit() else 0, entry, fields))
        out = []
        for _version, entry, fields in sorted(entries, key=lambda e: (-e[0], e[1].name)):
            karg = next((a for a in fields.get("options", "").split() if a.startswith("ostree=")), None)
            if karg is None:
                continue
            out.append(self._deployment(entry, karg.removeprefix("ostree=")))
        return out

    def _deployment(self, entry: Path, bootlink: str) -> Deployment:
        link = self.root / bootlink.lstrip("/")
        try:
            target = (link.parent / os.readlink(link)).resolve()
        except OSError as e:
            raise UserError(f"{entry}: ostree={bootlink}: {e.strerror}") from None
        m = re.fullmatch(r"([0-9a-f]{64})\.(\d+)", target.name)
        deploy_root = (self.root / "ostree/deploy").resolve()
        if m is None or target.parent.parent.parent != deploy_root or not target.is_dir():
            raise UserError(f"{entry}: ostree={bootlink} does not lead to a deployment ({target})")
        osname = target.parent.parent.name
        origin = target.with_name(target.name + ".origin")
        return Deployment(osname, m.group(1), int(m.group(2)), target, entry, _origin_imgref(origin))


def check_osname(osname: str) -> None:
    if not _OSNAME.match(osname):
        raise UserError(f"--os {osname!r}: not a valid stateroot name")


def _bls_fields(entry: Path) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in entry.read_text(errors="replace").splitlines():
        key, _, value = line.strip().partition(" ")
        if key and not key.startswith("#"):
            fields[key] = value.strip()
    return fields


def _origin_imgref(origin: Path) -> str | None:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(origin.read_text())
    except FileNotFoundError:
        return None
    except (configparser.Error, UnicodeDecodeError) as e:
        raise UserError(f"{origin}: {str(e).splitlines()[0]}") from None
    reference = parser.get("origin", "container-image-reference", fallback=None)
    return imgref_of_origin(reference) if reference else None
