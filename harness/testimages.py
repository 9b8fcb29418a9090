"""Small test images, defined as data in images/testimages/*.json, built with buildah, pushed to a registry.

Each definition lists layers; each layer lists entries (file, dir, hardlink, symlink, fifo, chardev,
delete, opaque, chmod). Files get deterministic, incompressible content seeded by their path, so the
expected tree (`expected_tree`) is computed from the definitions alone: an oracle independent of
podman and of anything this project reads back.

Building uses a scratch containers-storage in `workdir` (`--root/--runroot`, its own storage.conf),
never the host's; no RUN steps: `buildah from`, `buildah mount` + writes, `buildah commit`. Each image
is pushed twice, with gzip and with zstd layers, to `<registry>/bootc-unified-test/<name>-<compression>`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import tempfile
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from harness.run import run
from harness.scratchpodman import pinned_env, unmount_under

DEFINITIONS = Path(__file__).resolve().parent.parent / "images" / "testimages"
REPOSITORY = "bootc-unified-test"
TIMESTAMP = 1_700_000_000  # fixed file and creation times: the same definition gives the same layers
COMPRESSIONS = ("gzip", "zstd")
KINDS = ("file", "dir", "hardlink", "symlink", "fifo", "chardev", "delete", "opaque", "chmod")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class DefinitionError(ValueError):
    pass


def missing_prerequisites() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("root (device nodes, owners and security.capability in the test trees)")
    for tool in ("buildah", "skopeo"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found")
    return problems


# --- definitions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    type: str
    path: bytes
    size: int = 0
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    target: bytes = b""
    major: int = 0
    minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict[str, object], where: str) -> Entry:
        kind = str(d.get("type"))
        if kind not in KINDS:
            raise DefinitionError(f"{where}: unknown entry type {kind!r}")
        path = bytes.fromhex(str(d["path_hex"])) if "path_hex" in d else os.fsencode(str(d["path"]))
        if path.startswith(b"/") or b".." in path.split(b"/") or not path:
            raise DefinitionError(f"{where}: path {path!r} must be relative and stay inside the tree")
        xattrs = {str(k): str(v).encode() for k, v in dict(d.get("xattrs", {})).items()}  # type: ignore[call-overload]
        xattrs |= {str(k): bytes.fromhex(str(v)) for k, v in dict(d.get("xattrs_hex", {})).items()}  # type: ignore[call-overload]
        mode = d.get("mode")
        return cls(
            type=kind,
            path=path,
            size=int(d.get("size", 0)),  # type: ignore[call-overload]
            mode=int(str(mode), 8) if mode is not None else None,
            uid=int(d.get("uid", 0)),  # type: ignore[call-overload]
            gid=int(d.get("gid", 0)),  # type: ignore[call-overload]
            target=os.fsencode(str(d.get("target", ""))),
            major=int(d.get("major", 0)),  # type: ignore[call-overload]
            minor=int(d.get("minor", 0)),  # type: ignore[call-overload]
            xattrs=xattrs,
        )

    def content(self) -> bytes:
        """Deterministic, incompressible bytes: a PRNG seeded by the path."""
        return random.Random(self.path).randbytes(self.size)


@dataclass(frozen=True)
class ImageDef:
    name: str
    description: str
    layers: list[list[Entry]]
    base: str | None = None

    @classmethod
    def load(cls, path: Path) -> ImageDef:
        d = json.loads(path.read_text())
        layers = [
            [Entry.from_json(e, f"{path.name} layer {i} entry {j}") for j, e in enumerate(layer["entries"])]
            for i, layer in enumerate(d["layers"])
        ]
        return cls(name=d["name"], description=d.get("description", ""), layers=layers, base=d.get("base"))


def load_definitions(directory: Path = DEFINITIONS) -> dict[str, ImageDef]:
    defs = {}
    for path in sorted(directory.glob("*.json")):
        image = ImageDef.load(path)
        defs[image.name] = image
    for image in defs.values():
        if image.base is not None and image.base not in defs:
            raise DefinitionError(f"{image.name}: base image {image.base!r} is not defined")
    return defs


def build_order(defs: dict[str, ImageDef]) -> list[ImageDef]:
    done: list[str] = []

    def visit(name: str, seen: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in seen:
            raise DefinitionError(f"base images form a cycle: {' -> '.join((*seen, name))}")
        base = defs[name].base
        if base is not None:
            visit(base, (*seen, name))
        done.append(name)

    for name in defs:
        visit(name, ())
    return [defs[n] for n in done]


# --- the oracle: what the merged tree must contain ----------------------------------------------


@dataclass(frozen=True)
class Expected:
    type: str  # file, dir, symlink, fifo, chardev
    mode: int  # permission bits including setuid/setgid/sticky
    uid: int = 0
    gid: int = 0
    size: int = 0
    sha256: str = ""
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    inode: int = 0  # entries sharing an inode number are hard links of each other


DEFAULT_MODES = {"file": 0o644, "dir": 0o755, "symlink": 0o777, "fifo": 0o644, "chardev": 0o644}


def _parents(path: bytes) -> list[bytes]:
    parts = path.split(b"/")[:-1]
    return [b"/".join(parts[: i + 1]) for i in range(len(parts))]


def _apply_expected(tree: dict[bytes, Expected], e: Entry, next_inode: list[int]) -> None:
    def under(p: bytes) -> list[bytes]:
        return [k for k in tree if k == p or k.startswith(p + b"/")]

    if e.type not in ("delete", "chmod"):
        for parent in _parents(e.path):
            tree.setdefault(parent, Expected("dir", 0o755))
    if e.type == "delete":
        for k in under(e.path):
            del tree[k]
        return
    if e.type == "opaque":
        for k in under(e.path):
            del tree[k]
        tree[e.path] = Expected("dir", e.mode if e.mode is not None else 0o755, e.uid, e.gid)
        return
    if e.type == "chmod":
        old = tree[e.path]
        mode = e.mode if e.mode is not None else old.mode
        changed = {k for k, v in tree.items() if old.inode and v.inode == old.inode} | {e.path}
        for k in changed:
            tree[k] = Expected(**{**tree[k].__dict__, "mode": mode, "uid": e.uid, "gid": e.gid})
        return
    if e.type == "hardlink":
        tree[e.path] = tree[e.target]
        return
    mode = e.mode if e.mode is not None else DEFAULT_MODES[e.type]
    if e.type == "dir":
        tree[e.path] = Expected("dir", mode, e.uid, e.gid, xattrs=e.xattrs)
        return
    next_inode[0] += 1
    data = e.content() if e.type == "file" else b""
    # The layer tar carries empty-valued xattrs as PAX records, but Go's archive/tar reads an empty
    # PAX value as "delete this key", so podman's store (and anything extracted by Go) lacks them.
    xattrs = {k: v for k, v in e.xattrs.items() if v}
    tree[e.path] = Expected(
        type=e.type,
        mode=mode,
        uid=e.uid,
        gid=e.gid,
        size=len(data) if e.type == "file" else len(e.target) if e.type == "symlink" else 0,
        sha256=hashlib.sha256(data).hexdigest() if e.type == "file" else "",
        target=e.target,
        rdev=(e.major, e.minor),
        xattrs=xattrs,
        inode=next_inode[0],
    )


def expected_tree(defs: dict[str, ImageDef], name: str) -> dict[bytes, Expected]:
    """The merged tree of image `name` (its base first), paths relative without a leading slash."""
    chain = []
    image: ImageDef | None = defs[name]
    while image is not None:
        chain.append(image)
        image = defs[image.base] if image.base else None
    tree: dict[bytes, Expected] = {}
    counter = [0]
    for img in reversed(chain):
        for layer in img.layers:
            for e in layer:
                _apply_expected(tree, e, counter)
    return tree


def layer_count(defs: dict[str, ImageDef], name: str) -> int:
    image = defs[name]
    return len(image.layers) + (layer_count(defs, image.base) if image.base else 0)


# --- building -----------------------------------------------------------------------------------


def _write_entry(root: bytes, e: Entry) -> None:
    path = os.path.join(root, e.path)
    if e.type not in ("delete", "chmod", "opaque"):
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    match e.type:
        case "file":
            with open(path, "wb") as f:
                f.write(e.content())
        case "dir":
            os.makedirs(path, mode=0o755, exist_ok=True)
        case "hardlink":
            os.link(os.path.join(root, e.target), path)
            return
        case "symlink":
            os.symlink(e.target, path)
            os.lchown(path, e.uid, e.gid)
            return
        case "fifo":
            os.mkfifo(path)
        case "chardev":
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(e.major, e.minor))
        case "delete":
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            return
        case "opaque":
            shutil.rmtree(path)
            os.mkdir(path)
        case "chmod":
            pass
    # chown first: it clears setuid/setgid bits and security.capability.
    os.lchown(path, e.uid, e.gid)
    os.chmod(path, e.mode if e.mode is not None else DEFAULT_MODES.get(e.type, 0o755))
    for name, value in e.xattrs.items():
        os.setxattr(path, name, value)


@dataclass
class Buildah:
    """buildah on a scratch containers-storage under `workdir` (never the host's storage)."""

    workdir: Path
    env: dict[str, str] = field(init=False, repr=False)
    runroot: Path = field(init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # podman refuses a runroot longer than 50 characters: keep it short, outside workdir.
        self.runroot = Path(tempfile.mkdtemp(prefix="scratch-", dir="/tmp"))
        self.env = pinned_env(self.workdir, self.root, self.runroot)

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    def __call__(self, *args: str | Path) -> str:
        argv = [
            "buildah",
            "--root",
            self.root,
            "--runroot",
            self.runroot,
            "--storage-driver",
            "overlay",
            *args,
        ]
        return run(argv, env=self.env).stdout.strip()

    def close(self) -> None:
        """Remove working containers, unmount whatever the store left mounted, delete the store."""
        if self.root.exists():
            self("rm", "--all")
        unmount_under(self.workdir)
        shutil.rmtree(self.workdir, ignore_errors=True)
        unmount_under(self.runroot)
        shutil.rmtree(self.runroot, ignore_errors=True)


def build_image(b: Buildah, image: ImageDef) -> None:
    """Build `localhost/<name>:latest` layer by layer, one commit per layer."""
    base = f"localhost/{image.base}:latest" if image.base else "scratch"
    for entries in image.layers:
        container = b("from", "--pull-never", base)
        mount = b("mount", container)
        if not mount.startswith(str(b.root)):
            raise RuntimeError(f"buildah mounted {container} at {mount!r}, outside {b.root}")
        root = os.fsencode(mount)
        for e in entries:
            _write_entry(root, e)
        b(
            "commit",
            "--quiet",
            "--rm",
            "--timestamp",
            str(TIMESTAMP),
            container,
            f"localhost/{image.name}:latest",
        )
        base = f"localhost/{image.name}:latest"


# --- pushed images: what tests get ----------------------------------------------------------------


@dataclass(frozen=True)
class PushedImage:
    name: str
    refs: dict[str, str]  # compression -> "127.0.0.1:PORT/bootc-unified-test/NAME-COMPRESSION:latest"
    digests: dict[str, str]  # compression -> manifest digest "sha256:..."
    layers: int
    expected: dict[bytes, Expected] = field(repr=False)

    @property
    def ref(self) -> str:
        """The gzip reference (the common case)."""
        return self.refs["gzip"]

    def docker(self, compression: str = "gzip") -> str:
        return f"docker://{self.refs[compression]}"


@dataclass(frozen=True)
class TestImages:
    __test__ = False  # not a pytest test class

    registry_address: str
    images: dict[str, PushedImage]

    def __getitem__(self, name: str) -> PushedImage:
        return self.images[name]


def fetch_manifest(registry_address: str, repository: str, reference: str) -> dict[str, object]:
    req = urllib.request.Request(
        f"http://{registry_address}/v2/{repository}/manifests/{reference}", headers={"Accept": OCI_MANIFEST}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        manifest: dict[str, object] = json.load(resp)
        return manifest


def push(b: Buildah, name: str, registry_address: str, compression: str) -> tuple[str, str]:
    """Compress into a fresh OCI layout with buildah, then copy it verbatim with skopeo.

    A direct `buildah push --compression-format zstd` after a gzip push reuses the gzip blobs it
    already sent (c/image blob substitution); `skopeo copy --preserve-digests` forbids that.
    """
    repository = f"{REPOSITORY}/{name}-{compression}"
    ref = f"{registry_address}/{repository}:latest"
    layout = b.workdir / "layouts" / f"{name}-{compression}"
    layout.parent.mkdir(exist_ok=True)
    digestfile = b.workdir / f"{name}-{compression}.digest"
    b(
        "push",
        "--quiet",
        "--format",
        "oci",
        "--compression-format",
        compression,
        f"localhost/{name}:latest",
        f"oci:{layout}:latest",
    )
    run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
            "--digestfile",
            digestfile,
            f"oci:{layout}:latest",
            f"docker://{ref}",
        ],
        env=b.env,
    )
    digest = digestfile.read_text().strip()
    # Check what actually landed: blob reuse must not have swapped in layers of another compression.
    manifest = fetch_manifest(registry_address, repository, digest)
    layers = manifest["layers"]
    assert isinstance(layers, list)
    wrong = [x["mediaType"] for x in layers if not str(x["mediaType"]).endswith(f"+{compression}")]
    if wrong:
        raise RuntimeError(f"{ref}: pushed with {compression} but the registry holds layers {wrong}")
    return ref, digest


def build_and_push(
    registry_address: str,
    workdir: Path,
    compressions: Iterable[str] = COMPRESSIONS,
    definitions: Path = DEFINITIONS,
) -> TestImages:
    defs = load_definitions(definitions)
    b = Buildah(workdir)
    images = {}
    try:
        for image in build_order(defs):
            build_image(b, image)
        for image in defs.values():
            refs, digests = {}, {}
            for compression in compressions:
                refs[compression], digests[compression] = push(b, image.name, registry_address, compression)
            images[image.name] = PushedImage(
                name=image.name,
                refs=refs,
                digests=digests,
                layers=layer_count(defs, image.name),
                expected=expected_tree(defs, image.name),
            )
    finally:
        b.close()
    return TestImages(registry_address, images)
