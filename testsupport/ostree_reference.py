"""The slow way, as bootc's ostree container import does it, as an oracle and a baseline: each
layer's bit-exact tar (from the bootc store), filtered as ostree-ext filters it, committed with
`ostree commit --tree=tar=`, then all layer commits checked out on top of each other (union,
whiteouts processed; opaque directories emptied first, which ostree 2022.7's checkout does not do)
and the result committed. Every file's data passes through ostree's own writer (written again).

The tar filter is Python's tarfile, independent of the importer's own path mapping: `etc/` ->
`usr/etc/`, `var/` -> `usr/share/factory/var/` (unless `retain_var`), the children of run/tmp/proc/
sys/dev dropped; devices, FIFOs and names or symlink targets that are not UTF-8 dropped (ostree
refuses them); empty xattrs and
`trusted.overlay.*` dropped (podman does not keep the former, the overlay driver owns the latter).
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from bootc_unified.cstorage import Image, reassemble

EXCLUDED = ("run", "tmp", "proc", "sys", "dev")
OPAQUE = ".wh..wh..opq"


def ostree(*args: str | Path) -> str:
    return subprocess.run(["ostree", *map(str, args)], check=True, capture_output=True, text=True).stdout


def _map_name(name: str, retain_var: bool) -> str | None:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts:
        return "."
    top, rest = parts[0], parts[1:]
    if top == "etc":
        parts = ["usr", "etc", *rest]
    elif top == "var" and not retain_var:
        parts = ["usr", "share", "factory", "var", *rest]
    elif top in EXCLUDED and rest:
        return None
    return "/".join(parts)


def filter_layer(src: Path, dst: Path, retain_var: bool) -> list[str]:
    """Write the filtered tar; returns the opaque directories it marks (mapped paths)."""
    opaque: list[str] = []
    skipped: set[str] = set()
    with (
        tarfile.open(src, "r:", encoding="utf-8", errors="surrogateescape") as tin,
        tarfile.open(
            dst, "w:", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
        ) as tout,
    ):
        for m in tin:
            if m.ischr() or m.isblk() or m.isfifo():
                if m.ischr() and m.devmajor == 0 and m.devminor == 0:
                    raise ValueError(f"{m.name}: an overlay-style whiteout in a pushed layer")
                continue
            if not _utf8(m.name) or (m.issym() and not _utf8(m.linkname)):
                skipped.add(m.name.strip("/").removeprefix("./"))
                continue
            if m.islnk() and m.linkname.strip("/").removeprefix("./") in skipped:
                continue
            name = _map_name(m.name, retain_var)
            if name is None:
                continue
            if m.islnk():
                target = _map_name(m.linkname, retain_var)
                if target is None:
                    continue
                m.linkname = target
            m.name = name
            if name.rsplit("/", 1)[-1] == OPAQUE:
                opaque.append(name.rpartition("/")[0] or ".")
            m.pax_headers = {
                k: v
                for k, v in m.pax_headers.items()
                if not (
                    k.startswith("SCHILY.xattr.")
                    and (v == "" or k.startswith("SCHILY.xattr.trusted.overlay."))
                )
            }
            data = tin.extractfile(m) if m.isfile() else None
            tout.addfile(m, data)
    return opaque


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # surrogate-escaped bytes that were not UTF-8
        return False
    return True


@dataclass(frozen=True)
class Reference:
    commit: str
    layer_tar_bytes: int  # bytes of layer tars fed to ostree


def reference_commit(
    repo: Path, image: Image, work: Path, retain_var: bool, branch: str | None = None
) -> Reference:
    """The slow way into `repo` (a bare ostree repository); returns the merged commit."""
    work.mkdir(parents=True, exist_ok=True)
    checkout = work / "merged"
    tar_bytes = 0
    for i, layer in enumerate(image.layers):
        raw, filtered = work / f"layer{i}.tar", work / f"layer{i}.filtered.tar"
        with raw.open("wb") as f:
            reassemble(layer, f)
        opaque = filter_layer(raw, filtered, retain_var)
        tar_bytes += filtered.stat().st_size
        raw.unlink()
        commit = ostree(
            "commit",
            f"--repo={repo}",
            "--orphan",
            "--no-bindings",
            "--tar-autocreate-parents",
            f"--tree=tar={filtered}",
        ).strip()
        filtered.unlink()
        for d in opaque:
            target = checkout / d if d != "." else checkout
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
        ostree("checkout", f"--repo={repo}", "--union", "--whiteouts", commit, checkout)
    for marker in checkout.rglob(OPAQUE):
        marker.unlink()
    args = ["commit", f"--repo={repo}", "--no-bindings", "--link-checkout-speedup", f"--tree=dir={checkout}"]
    args += [f"--branch={branch}"] if branch else ["--orphan"]
    merged = ostree(*args).strip()
    shutil.rmtree(checkout)
    return Reference(merged, tar_bytes)
