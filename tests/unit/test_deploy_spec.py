"""The status document (deploy/spec.py) against golden fixtures in bootc's shape, both directions:
dump == golden text, and parsing the golden text gives the object."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bootc_unified.deploy.spec import (
    BootEntry,
    BootEntryComposefs,
    Host,
    HostSpec,
    HostStatus,
    ImageReference,
    ImageStatus,
)
from bootc_unified.deploy.status import only_booted, render_yaml
from bootc_unified.jsonmodel import from_dict, to_dict
from harness.pytest_plugin import require

FIXTURES = Path(__file__).parent / "fixtures"
ID_A, ID_B, ID_C = "a" * 128, "b" * 128, "c" * 128
REF = ImageReference("quay.io/example/os:latest", "registry")


def entry(depl_id: str, version: str, digest: str, **kw: object) -> BootEntry:
    return BootEntry(
        image=ImageStatus(REF, version, "2023-11-14T22:13:20Z", digest, "amd64"),
        composefs=BootEntryComposefs(depl_id, "Bls", "systemd", "d" * 64, missing_verity_allowed=False),
        **kw,  # type: ignore[arg-type]
    )


HOSTS = {
    "status-booted.json": Host(
        spec=HostSpec(image=REF),
        status=HostStatus(booted=entry(ID_A, "1.0", "sha256:" + "1" * 64, unified=True)),
    ),
    "status-staged-rollback.json": Host(
        spec=HostSpec(image=REF),
        status=HostStatus(
            staged=entry(ID_C, "3.0", "sha256:" + "3" * 64, download_only=True, soft_reboot_capable=True),
            booted=entry(ID_B, "2.0", "sha256:" + "2" * 64, unified=True),
            rollback=entry(ID_A, "1.0", "sha256:" + "1" * 64),
        ),
    ),
    "status-rollback-queued.json": Host(
        spec=HostSpec(image=REF, boot_order="rollback"),
        status=HostStatus(
            booted=entry(ID_B, "2.0", "sha256:" + "2" * 64),
            rollback=entry(ID_A, "1.0", "sha256:" + "1" * 64),
            other_deployments=(BootEntry(image=None, composefs=None),),
            rollback_queued=True,
        ),
    ),
    "status-empty.json": Host(),
}


def pretty(host: Host) -> str:
    return json.dumps(to_dict(host), sort_keys=True, indent=2) + "\n"


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_dump_equals_golden(name: str) -> None:
    assert pretty(HOSTS[name]) == (FIXTURES / name).read_text()


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_parse_golden_gives_object(name: str) -> None:
    text = (FIXTURES / name).read_text()
    assert Host.from_json(text) == HOSTS[name]
    # canonical form: compact and sorted, and it parses back too
    canonical = HOSTS[name].to_json()
    assert canonical == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert Host.from_json(canonical) == HOSTS[name]


def test_bootc_shape() -> None:
    doc = to_dict(HOSTS["status-staged-rollback.json"])
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec", "status"}
    assert set(doc["status"]) == {
        "staged",
        "booted",
        "rollback",
        "rollbackQueued",
        "type",
        "usrOverlay",
        "readOnly",
    }
    assert set(doc["status"]["booted"]) == {
        "image",
        "cachedUpdate",
        "incompatible",
        "pinned",
        "softRebootCapable",
        "downloadOnly",
        "store",
        "ostree",
        "composefs",
        "unified",
    }
    assert "signature" not in doc["spec"]["image"]  # omitted when none
    assert "otherDeployments" in to_dict(HOSTS["status-rollback-queued.json"])["status"]


def test_unknown_or_mistyped_fields_rejected() -> None:
    doc = json.loads((FIXTURES / "status-booted.json").read_text())
    doc["status"]["booted"]["bogus"] = 1
    with pytest.raises(ValueError, match=r"\$\.status\.booted: unknown field 'bogus'"):
        from_dict(Host, doc)
    doc = json.loads((FIXTURES / "status-booted.json").read_text())
    doc["status"]["rollbackQueued"] = "yes"
    with pytest.raises(ValueError, match=r"rollbackQueued: expected bool"):
        from_dict(Host, doc)
    doc["status"]["rollbackQueued"] = False
    doc["status"]["booted"]["composefs"]["bootType"] = "Weird"
    with pytest.raises(ValueError, match="not one of"):
        from_dict(Host, doc)


def test_booted_filter() -> None:
    host = only_booted(HOSTS["status-staged-rollback.json"])
    assert host.status.staged is None and host.status.rollback is None
    assert host.status.booted == HOSTS["status-staged-rollback.json"].status.booted


YAML_TO_JSON = "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_yaml_is_the_same_document(name: str) -> None:
    """The oracle is a real YAML parser: Debian's python3-yaml under the system python."""
    proc = subprocess.run(
        ["/usr/bin/python3", "-c", YAML_TO_JSON],
        input=render_yaml(HOSTS[name]),
        capture_output=True,
        text=True,
    )
    require([] if proc.returncode == 0 else [f"python3-yaml ({proc.stderr.strip()[-80:]})"], "a YAML oracle")
    assert json.loads(proc.stdout) == to_dict(HOSTS[name])
