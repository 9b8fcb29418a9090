"""Hostile and broken input to the import: the two outcomes every case must end in, as assertions.

Either the import is refused with one line naming the thing at fault, a non-zero exit and nothing
published (no ref under streams/refs or images/refs, `internals cfs fsck` clean, no temporary
file left in the repository); or it is imported exactly as podman shows the image: the kernel's
mount of our EROFS image equals podman's own mount of the image path by path, and every layer
stream in the repository hashes to the DiffID known before the store ever saw the layer.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bootc_unified.erofs.mount import mounted
from bootc_unified.importer import layer_content_id
from bootc_unified.repository import Repository
from harness.treecompare import Snapshot, differences, snapshot_dir
from testsupport.cstore_fixtures import StoreDirs
from testsupport.plugin import run_cli
from testsupport.tarlayer import TarEntry, entry, make_tar

# The bottom layer of every crafted image: a directory with a file, a file, a symlink.
BASE = make_tar(
    entry("etc", b"", type=tarfile.DIRTYPE, mode=0o755),
    entry("etc/os-release", b"ID=hostile\n"),
    entry("target", b"t" * 100),
    entry("d", b"", type=tarfile.DIRTYPE, mode=0o755),
    entry("d/file", b"f" * 100),
)


def tar(*entries: TarEntry) -> bytes:
    return make_tar(*entries)


def directory(name: str, mode: int = 0o755, **attrs: object) -> TarEntry:
    return entry(name, b"", type=tarfile.DIRTYPE, mode=mode, **attrs)


def symlink(name: str, target: str) -> TarEntry:
    return entry(name, b"", type=tarfile.SYMTYPE, linkname=target)


def hardlink(name: str, target: str) -> TarEntry:
    return entry(name, b"", type=tarfile.LNKTYPE, linkname=target)


@dataclass(frozen=True)
class Case:
    """One crafted image: `layers` on top of BASE. `outcome` is "pull-refused" (containers/storage
    refuses it, so it never reaches the import), "refused" (we refuse it; the error line must contain
    every string of `names`), or "as-podman" (imported as podman shows it; `podman_mtime` are paths
    of directories podman creates implicitly and stamps with the extraction time, `podman_ghosts`
    names podman's mount lists but cannot stat, see assert_as_podman)."""

    layers: tuple[bytes, ...]
    outcome: str
    names: tuple[str, ...] = ()
    podman_mtime: tuple[str, ...] = ()
    podman_ghosts: tuple[str, ...] = ()
    pull_refused_on: tuple[str, ...] = ()  # filesystems where containers/storage cannot unpack it
    fs_size: int | None = None  # of the loop filesystem, when the default (1 GiB) is too small


# --- the repository side ----------------------------------------------------------------------


def init_repo(path: Path) -> Path:
    run_cli("internals", "cfs", "--repo", path, "init", "--insecure")
    return path


def import_cli(
    repo: Path, storage: Path, ref: str, zerocopy: bool = False
) -> subprocess.CompletedProcess[str]:
    flags = ["--zerocopy"] if zerocopy else []
    return run_cli(
        "internals", "cfs", "--repo", repo, "import", *flags, "--storage", storage, ref, check=False
    )


def published(repo: Path) -> list[Path]:
    """Every ref (and leftover temporary ref) under streams/refs and images/refs."""
    return sorted(
        p for top in ("streams/refs", "images/refs") for p in (repo / top).rglob("*") if not p.is_dir()
    )


def assert_nothing_published(repo: Path) -> None:
    assert published(repo) == []
    fsck = run_cli("internals", "cfs", "--repo", repo, "fsck", check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert [p for p in repo.rglob(".tmp-*")] == []


def assert_one_line(proc: subprocess.CompletedProcess[str], *names: str) -> str:
    """Non-zero exit, nothing on stdout, exactly one stderr line, naming each of `names`."""
    assert proc.returncode != 0, proc.stdout
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("bootc-unified: error: "), lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def assert_refused(proc: subprocess.CompletedProcess[str], repo: Path, *names: str) -> str:
    line = assert_one_line(proc, *names)
    assert_nothing_published(repo)
    return line


def assert_streams_match_diff_ids(repo_path: Path, diff_ids: Iterable[str]) -> None:
    """Each layer stream's bytes (inline + objects) hash to the DiffID computed from our own tar."""
    repo = Repository.open(repo_path)
    for diff_id in diff_ids:
        stream = repo.open_stream(layer_content_id(diff_id))
        sha = hashlib.sha256()
        for chunk in repo.cat_stream(stream):
            sha.update(chunk)
        assert "sha256:" + sha.hexdigest() == diff_id


# --- the kernel's and podman's views ---------------------------------------------------------


def kernel_view(repo: Path, image_id: str, mnt: Path) -> Snapshot:
    mnt.mkdir(exist_ok=True)
    image = repo / "objects" / image_id[:2] / image_id[2:]
    with mounted(image, repo / "objects", mnt):
        return snapshot_dir(mnt)


def podman_view(store: StoreDirs, ref: str, ghosts: list[bytes] | None = None) -> Snapshot:
    out = subprocess.run(
        store.podman("image", "mount", ref), env=store.env, check=True, capture_output=True, text=True
    )
    try:
        return snapshot_dir(Path(out.stdout.strip()), ghosts)
    finally:
        subprocess.run(store.podman("image", "unmount", ref), env=store.env, capture_output=True)


def assert_as_podman(
    store: StoreDirs,
    repo: Path,
    ref: str,
    diff_ids: Iterable[str],
    mnt: Path,
    podman_mtime: Iterable[str] = (),
    podman_ghosts: Iterable[str] = (),
    zerocopy: bool = False,
) -> dict[str, object]:
    """Import `ref` (must succeed, stdout JSON only), then compare the kernel's view of our image with
    podman's mount; returns the import's JSON. `podman_ghosts` are the names podman's mount lists but
    cannot stat (whiteouts overlayfs leaks from a directory it does not merge): no container can open
    them, so our image has none."""
    proc = import_cli(repo, store.root, ref, zerocopy)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out: dict[str, object] = json.loads(proc.stdout)
    assert_streams_match_diff_ids(repo, diff_ids)
    image_id = out["image_id"]
    assert isinstance(image_id, str)
    ours = kernel_view(repo, image_id, mnt)
    ghosts: list[bytes] = []
    theirs = podman_view(store, ref, ghosts)
    assert sorted(ghosts) == sorted(b"/" + g.encode() for g in podman_ghosts)
    ours.records[b"/"] = theirs.records[b"/"]  # the root's metadata is podman's own choice
    for path in podman_mtime:  # directories podman made implicitly, stamped at extraction time
        key = b"/" + path.encode()
        a, b = theirs.records.get(key), ours.records.get(key)
        assert a is not None and b is not None, path
        ours.records[key] = b.__class__(**{**b.__dict__, "mtime": a.mtime, "mtime_nsec": a.mtime_nsec})
    assert differences(theirs, ours) == []
    run_cli("internals", "cfs", "--repo", repo, "fsck")
    return out


# --- crafted data in a real registry (its HTTP API; tampering behind it on its disk) --------------


def _request(method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> str:
    import urllib.request

    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return str(resp.headers.get("Location") or "")


def push_blob(base_url: str, name: str, data: bytes) -> str:
    """Upload `data` as a blob of repository `name` (monolithic POST + PUT); returns its digest."""
    import urllib.parse

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    location = _request("POST", f"{base_url}/v2/{name}/blobs/uploads/", b"")
    location = urllib.parse.urljoin(base_url, location)
    sep = "&" if "?" in location else "?"
    _request("PUT", f"{location}{sep}digest={digest}", data, {"Content-Type": "application/octet-stream"})
    return digest


def push_manifest(base_url: str, name: str, tag: str, data: bytes, media_type: str) -> str:
    _request("PUT", f"{base_url}/v2/{name}/manifests/{tag}", data, {"Content-Type": media_type})
    return "sha256:" + hashlib.sha256(data).hexdigest()


def registry_blob_path(registry_dir: Path, digest: str) -> Path:
    """Where Distribution's filesystem driver keeps a blob's bytes."""
    hexd = digest.split(":", 1)[1]
    return (
        registry_dir / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"
    )
