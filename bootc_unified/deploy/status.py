"""`status`: the Host document built from the physical root, the ESP, the booted id and the staged
marker (bootc `BC/status.rs`, reference/deployments.md sections 4 and 9), rendered as JSON, YAML or
for people.

- Deployments come from the boot entries (`loader/entries` in boot-menu order, then
  `loader/entries.staged`), each one's id from its `composefs=` option.
- booted = the entry of the booted id; staged = the entry the marker names; the remaining entries of
  `loader/entries` in menu order: first = rollback, the rest = otherDeployments.
- rollbackQueued = the first (default) entry is not the booted one; then spec.bootOrder = rollback.
- Each entry's image: `.origin` (reference, manifest digest, boot digest) and the manifest/config
  streams of the repository (version = manifest annotation org.opencontainers.image.version, else
  the config label; timestamp = config `created`; architecture = config `architecture`).
- An entry with a problem (no origin, manifest not in the repository, what stops it from booting:
  bootable.py) is still listed, with what could be read; the problem is reported beside the
  document (`StatusReport.problems`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bootc_unified.cstorage import Store
from bootc_unified.deploy import bls, bootable
from bootc_unified.deploy.origin import Origin
from bootc_unified.deploy.spec import (
    BootEntry,
    BootEntryComposefs,
    Host,
    HostSpec,
    HostStatus,
    ImageReference,
    ImageStatus,
)
from bootc_unified.deploy.staged import StagedMarker
from bootc_unified.deploy.sysroot import Esp, Sysroot
from bootc_unified.errors import UserError
from bootc_unified.importer import manifest_content_id
from bootc_unified.jsonmodel import to_dict
from bootc_unified.repository import Repository, splitstream

VERSION_KEY = "org.opencontainers.image.version"
FORMATS = ("humanreadable", "yaml", "json")


@dataclass
class StatusReport:
    host: Host
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Deployment:
    depl_id: str
    entry: bls.EntryFile
    staged_dir: bool  # found in loader/entries.staged


class _ImageStore:
    """Manifest digests held by the bootc store, read from its records (no podman)."""

    def __init__(self, root: Path) -> None:
        self.digests: set[str] = set()
        if not (root / "overlay-images").is_dir():
            return
        for rec in Store.open(root).images():
            if rec.digest:
                self.digests.add(rec.digest)
            self.digests.update(
                k.removeprefix("manifest-") for k in rec.big_data_names if k.startswith("manifest-")
            )

    def has(self, manifest_digest: str) -> bool:
        return manifest_digest in self.digests


def _rfc3339(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    when = when.astimezone(UTC)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if when.microsecond:
        text += f".{when.microsecond:06d}".rstrip("0")
    return text + "Z"


def image_status(
    repo: Repository | None, ref: ImageReference, manifest_digest: str
) -> tuple[ImageStatus, str | None]:
    """The entry's ImageStatus from the repository's manifest and config streams; (status, problem)."""
    version = timestamp = None
    architecture = ""
    problem = None
    try:
        if repo is None:
            raise UserError("no composefs repository")
        stream = repo.open_stream(manifest_content_id(manifest_digest), splitstream.OCI_MANIFEST)
        manifest = json.loads(b"".join(repo.cat_stream(stream)))
        if len(stream.named_refs) != 1:
            raise UserError(f"manifest stream {manifest_digest} names no config")
        [(_, config_id)] = stream.named_refs.items()
        config_stream = repo.open_stream_object(config_id, splitstream.OCI_CONFIG)
        config = json.loads(b"".join(repo.cat_stream(config_stream)))
        labels = (config.get("config") or {}).get("Labels") or {}
        version = (manifest.get("annotations") or {}).get(VERSION_KEY) or labels.get(VERSION_KEY)
        timestamp = _rfc3339(config.get("created"))
        architecture = str(config.get("architecture") or "")
    except (UserError, ValueError, AttributeError) as e:
        problem = f"image {manifest_digest}: {e}"
    return ImageStatus(ref, version, timestamp, manifest_digest, architecture), problem


def _boot_digest(sysroot: Sysroot, depl_id: str) -> str | None:
    """The boot digest a deployment's origin records; None when the origin is missing or garbled
    (its deployment's own entry names that problem)."""
    try:
        return Origin.read(sysroot.origin(depl_id)).boot.digest
    except UserError:
        return None


def _options_key(entry: bls.BlsEntry) -> list[str]:
    from bootc_unified.boot.cmdline import key_value, split_cmdline

    return sorted(a for a in split_cmdline(entry.options or "") if key_value(a)[0] != "composefs")


def build(
    sysroot: Sysroot,
    esp: Esp,
    booted_id: str | None,
    staged: StagedMarker | None,
    missing_verity_allowed: bool | None = None,
) -> StatusReport:
    """The Host of `sysroot`/`esp` with `booted_id` booted. `missing_verity_allowed`: the booted
    command line's `?` flag (None: take it from the booted entry, else from each entry)."""
    problems: list[str] = []
    deployments: list[_Deployment] = []
    for directory, is_staged in ((esp.entries, False), (esp.entries_staged, True)):
        try:
            entry_files = bls.read_entries(directory)
        except UserError as e:
            if not is_staged:
                raise  # no boot menu: nothing to report on
            problems.append(f"{e} (the staged deployment is left out)")
            continue
        for ef in entry_files:
            try:
                arg = ef.entry.composefs
            except UserError as e:
                problems.append(f"{ef.path}: {e}")
                continue
            if arg is None:
                continue  # not one of ours
            if any(d.depl_id == arg.digest for d in deployments):
                continue  # the staged dir repeats the booted entry
            deployments.append(_Deployment(arg.digest, ef, is_staged))

    try:
        repo: Repository | None = Repository.open(sysroot.repo)
    except UserError as e:
        repo = None
        problems.append(str(e))
    try:
        store = _ImageStore(sysroot.store)
    except UserError as e:
        store = _ImageStore(Path("/nonexistent"))
        problems.append(str(e))

    booted_dep = next((d for d in deployments if d.depl_id == booted_id), None)
    if missing_verity_allowed is None and booted_dep is not None:
        booted_arg = booted_dep.entry.entry.composefs
        missing_verity_allowed = bool(booted_arg and booted_arg.insecure)

    def entry_for(dep: _Deployment) -> BootEntry:
        arg = dep.entry.entry.composefs
        insecure = (
            missing_verity_allowed if missing_verity_allowed is not None else bool(arg and arg.insecure)
        )
        image = None
        boot_digest = None
        unified = False
        pull_path = None
        try:
            origin = Origin.read(sysroot.origin(dep.depl_id))
        except UserError as e:
            problems.append(f"deployment {dep.depl_id[:16]}…: {e}")
        else:
            boot_digest = origin.boot.digest
            image, problem = image_status(repo, origin.imgref, origin.image.manifest_digest)
            if problem:
                problems.append(f"deployment {dep.depl_id[:16]}…: {problem}")
            unified = store.has(origin.image.manifest_digest)
            pull_path = origin.ours.pull_path
        whole = dep is not booted_dep  # the booted image is mounted: reading it all is no news
        for problem in bootable.problems(sysroot, repo, dep.depl_id, whole):
            problems.append(f"deployment {dep.depl_id[:16]}…: {problem}")
        soft = False
        if booted_dep is not None and dep is not booted_dep:
            soft = bool(
                boot_digest is not None
                and _boot_digest(sysroot, booted_dep.depl_id) == boot_digest
                and _options_key(dep.entry.entry) == _options_key(booted_dep.entry.entry)
            )
        return BootEntry(
            image=image,
            soft_reboot_capable=soft,
            download_only=bool(staged and staged.depl_id == dep.depl_id and staged.finalization_locked),
            composefs=BootEntryComposefs(
                verity=dep.depl_id,
                boot_type="Bls",
                bootloader="systemd",
                boot_digest=boot_digest,
                missing_verity_allowed=insecure,
            ),
            unified=unified,
            pull_path=pull_path,
        )

    staged_dep = None
    if staged is not None:
        staged_dep = next((d for d in deployments if d.depl_id == staged.depl_id), None)
        if staged_dep is None:
            problems.append(f"staged deployment {staged.depl_id[:16]}… has no boot entry")
    rest = [d for d in deployments if not d.staged_dir and d not in (booted_dep, staged_dep)]
    booted_entry = entry_for(booted_dep) if booted_dep else None
    staged_entry = entry_for(staged_dep) if staged_dep else None
    rollback_entry = entry_for(rest[0]) if rest else None
    others = tuple(entry_for(d) for d in rest[1:])
    menu = [d for d in deployments if not d.staged_dir]
    rollback_queued = booted_dep is not None and bool(menu) and menu[0] is not booted_dep
    spec_image = None
    for candidate in (staged_entry, booted_entry):
        if candidate is not None and candidate.image is not None:
            spec_image = candidate.image.image
            break
    host = Host(
        spec=HostSpec(image=spec_image, boot_order="rollback" if rollback_queued else "default"),
        status=HostStatus(
            staged=staged_entry,
            booted=booted_entry,
            rollback=rollback_entry,
            other_deployments=others,
            rollback_queued=rollback_queued,
            read_only=sysroot.on_read_only_medium(),
        ),
    )
    return StatusReport(host, problems)


def only_booted(host: Host) -> Host:
    """`--booted`: staged and rollback left out (bootc `filter_to_slot(Booted)`)."""
    return replace(host, status=replace(host.status, staged=None, rollback=None))


# --- rendering ----------------------------------------------------------------------------------


def render_json(host: Host) -> str:
    return host.to_json() + "\n"


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))  # a double-quoted YAML scalar is a JSON string


def _yaml(value: Any, indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key in sorted(value):
            v = value[key]
            if (isinstance(v, dict) and v) or (isinstance(v, list) and v):
                lines.append(f"{pad}{key}:")
                lines += _yaml(v, indent + 1)
            else:
                empty = "{}" if isinstance(v, dict) else "[]" if isinstance(v, list) else None
                lines.append(f"{pad}{key}: {empty or _yaml_scalar(v)}")
    elif isinstance(value, list):
        for item in value:
            sub = _yaml(item, indent + 1)
            first = sub[0].lstrip() if sub else "null"
            lines.append(f"{pad}- {first}")
            lines += sub[1:]
    else:
        lines.append(f"{pad}{_yaml_scalar(value)}")
    return lines


def render_yaml(host: Host) -> str:
    """YAML by hand (no YAML library on the target): block mappings, quoted strings, sorted keys."""
    return "\n".join(_yaml(to_dict(host), 0)) + "\n"


def _slot_lines(label: str, entry: BootEntry | None) -> list[str]:
    if entry is None:
        return []
    lines = []
    if entry.image is not None:
        ref = entry.image.image
        version = f" (version {entry.image.version})" if entry.image.version else ""
        lines.append(f"{label}: {ref}{version}")
        lines.append(f"  Digest: {entry.image.image_digest} ({entry.image.architecture or 'unknown arch'})")
        if entry.image.timestamp:
            lines.append(f"  Timestamp: {entry.image.timestamp}")
    else:
        lines.append(f"{label}: (image unknown)")
    if entry.composefs is not None:
        lines.append(f"  Verity: {entry.composefs.verity}")
        lines.append(
            "  FsVerity: " + ("Not Enforced" if entry.composefs.missing_verity_allowed else "Enforced")
        )
    lines.append(f"  Unified storage: {'yes' if entry.unified else 'no'}")
    if entry.pull_path:
        lines.append(f"  Pull path: {entry.pull_path}")
    if entry.download_only:
        lines.append("  Download-only: yes")
    return lines


def render_human(report: StatusReport) -> str:
    st = report.host.status
    lines: list[str] = []
    for label, entry in (
        ("Staged image", st.staged),
        ("● Booted image", st.booted),
        ("Rollback image", st.rollback),
    ):
        block = _slot_lines(label, entry)
        if block:
            lines += [*block, ""]
    for n, entry in enumerate(st.other_deployments, 1):
        lines += [*_slot_lines(f"Other deployment {n}", entry), ""]
    if not lines:
        lines = ["No deployments found.", ""]
    if st.rollback_queued:
        lines.append("Rollback queued: the next boot starts the rollback deployment.")
    for problem in report.problems:
        lines.append(f"Problem: {problem}")
    return "\n".join(lines).rstrip("\n") + "\n"


def render(report: StatusReport, fmt: str) -> str:
    if fmt == "json":
        return render_json(report.host)
    if fmt == "yaml":
        return render_yaml(report.host)
    if fmt == "humanreadable":
        return render_human(report)
    raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
