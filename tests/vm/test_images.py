"""Guest image variants, built from images/guest/*.toml: layer structure and content changes."""

from __future__ import annotations

import pytest

from harness.images import load_variant, variant_names
from harness.pytest_vm import GuestImages

pytestmark = pytest.mark.vm


def test_definitions_load() -> None:
    assert {"v1", "v2", "alt", "app"} <= set(variant_names())
    for name in variant_names():
        assert load_variant(name).layers


def test_variants_share_layers(guest_image: GuestImages) -> None:
    v1, v2, alt, app = (guest_image(v) for v in ("v1", "v2", "alt", "app"))
    assert len(v1.layers) == 3  # base OS, our package, version
    assert v2.layers[:3] == v1.layers and len(v2.layers) == 4  # one new layer on top of v1
    assert alt.layers[:2] == v1.layers[:2] and alt.layers[2] != v1.layers[2]
    assert not set(app.layers) & set(v1.layers)
    assert guest_image("v1") is v1  # cached per session


def test_v2_adds_changes_and_removes(guest_image: GuestImages) -> None:
    builder = guest_image.builder
    with builder.rootfs(guest_image("v1")) as root:
        files = root / "usr/share/bootc-unified"
        v1 = {p.name: p.read_text() for p in files.iterdir()}
        assert (root / "usr/lib/python3/dist-packages/bootc_unified/__init__.py").is_file()
        assert (root / "usr/bin/bootc-unified").stat().st_mode & 0o111
    with builder.rootfs(guest_image("v2")) as root:
        v2 = {p.name: p.read_text() for p in (root / "usr/share/bootc-unified").iterdir()}
        assert (root / "usr/lib/bootc-unified/version").read_text() == "v2\n"
    assert set(v2) - set(v1) == {"added-in-v2.txt"}
    assert set(v1) - set(v2) == {"removed-in-v2.txt"}
    assert v1["changed.txt"] != v2["changed.txt"]
    assert v1["unchanged.txt"] == v2["unchanged.txt"]


def test_second_build_is_cached(guest_image: GuestImages) -> None:
    guest_image("v1")
    again = guest_image.builder.build("v1")
    assert again.built_seconds == 0.0
    assert again.image_id == guest_image("v1").image_id
