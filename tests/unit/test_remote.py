"""deploy/remote.py: registry names resolved through registries.conf.d as podman does, and the
`[bootc-unified] pull-path` origin section (written, read back, refused when unknown)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootc_unified.deploy.origin import Origin, OursSection
from bootc_unified.deploy.remote import Endpoint, resolve, split_ref
from bootc_unified.deploy.spec import ImageReference
from bootc_unified.errors import UserError


def test_split_ref() -> None:
    assert split_ref("quay.io/a/b") == ("quay.io", "a/b", "latest")
    assert split_ref("docker://127.0.0.1:5000/a/b:v2") == ("127.0.0.1:5000", "a/b", "v2")
    assert split_ref("localhost/x@sha256:ab") == ("localhost", "x", "sha256:ab")
    with pytest.raises(UserError, match="not a fully qualified"):
        split_ref("fedora:40")


def test_resolve_through_registries_d(tmp_path: Path) -> None:
    d = tmp_path / "registries.conf.d"
    d.mkdir()
    (d / "50-other.conf").write_text('[[registry]]\nprefix = "bootc-unified.test"\nlocation = "wrong:1"\n')
    (d / "60-test.conf").write_text(
        '[[registry]]\nprefix = "bootc-unified.test/os"\nlocation = "10.0.2.2:5000/bootc-unified-test/os"\n'
        "insecure = true\n"
        '[[registry]]\nlocation = "blocked.example"\nblocked = true\n'
    )
    # the longest prefix wins; insecure comes from the entry
    assert resolve("bootc-unified.test/os:v2", registries_d=d) == Endpoint(
        "10.0.2.2:5000", "bootc-unified-test/os", "v2", True
    )
    assert resolve("bootc-unified.test/app", registries_d=d) == Endpoint("wrong:1", "app", "latest", False)
    # a prefix matches whole path components only
    assert resolve("bootc-unified.test/osx:1", registries_d=d).host == "wrong:1"
    assert resolve("quay.io/a/b:1", tls_verify=False, registries_d=d) == Endpoint("quay.io", "a/b", "1", True)
    assert resolve("docker.io/busybox", registries_d=d) == Endpoint(
        "registry-1.docker.io", "library/busybox", "latest", False
    )
    with pytest.raises(UserError, match="blocked"):
        resolve("blocked.example/x", registries_d=d)
    (d / "70-bad.conf").write_text("[[registry]\n")
    with pytest.raises(UserError, match=r"70-bad\.conf"):
        resolve("quay.io/a/b", registries_d=d)


def test_origin_pull_path_round_trip() -> None:
    origin = Origin.new(ImageReference("quay.io/a/b:1", "registry"), "ab" * 32, "sha256:" + "cd" * 32)
    assert "bootc-unified" not in origin.render()  # bootc's three sections only, unless recorded
    ours = Origin(origin.origin, origin.boot, origin.image, OursSection("direct"))
    text = ours.render()
    assert text.endswith("\n[bootc-unified]\npull-path = direct\n")
    assert Origin.parse(text, "x.origin") == ours
    with pytest.raises(UserError, match="pull-path 'sideways'"):
        Origin.parse(text.replace("direct", "sideways"), "x.origin")
