"""A user's image standing in for a built-in one (`bootc-unified-qualify --image REF`): read with
skopeo, copied into the session's test registry under the scenario's name, what GuestImages hands
the scenarios.

Oracles: the registry's own view of the copy (skopeo inspect of the pushed name: config digest and
layers), the config bytes hashed here, and the bytes of the layers the test wrote.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from harness import userimages
from harness.images import ImageBuilder
from harness.images.buildah import Buildah
from harness.pytest_vm import GuestImages
from harness.registry import Registry
from testsupport.cstore_fixtures import BuiltImage, base_layer, change_layer, write_oci_layout


def skopeo_json(*args: str) -> dict[str, object]:
    out = subprocess.run(["skopeo", *args], capture_output=True, text=True, check=True).stdout
    doc: dict[str, object] = json.loads(out)
    return doc


@pytest.fixture
def user_ref(tmp_path: Path) -> tuple[str, BuiltImage]:
    image = BuiltImage("mine", (base_layer(), change_layer()))
    write_oci_layout(tmp_path / "layout", [image])
    return f"oci:{tmp_path / 'layout'}:mine", image


def test_transport_defaults_to_docker() -> None:
    assert userimages.with_transport("quay.io/x/os:1") == "docker://quay.io/x/os:1"
    assert userimages.with_transport("oci:/d:t") == "oci:/d:t"
    assert userimages.with_transport("containers-storage:localhost/x") == "containers-storage:localhost/x"


def test_unreadable_image_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(userimages.UserImageError) as e:
        userimages.inspect(f"oci:{tmp_path / 'nothing'}:x")
    assert str(e.value).startswith(f"image oci:{tmp_path / 'nothing'}:x: ") and "\n" not in str(e.value)


def test_stands_in_for_v1_and_lands_under_the_scenarios_name(
    user_ref: tuple[str, BuiltImage], registry: Registry, tmp_path: Path
) -> None:
    ref, built = user_ref
    user = userimages.inspect(ref)
    assert user.layers == built.diff_ids
    images = GuestImages(
        ImageBuilder(public_key="ssh-ed25519 AAAA test", buildah=Buildah(tmp_path / "b", tmp_path / "r")),
        {"v1": user},
    )
    assert images.is_user("v1") and not images.is_user("v2")
    v1 = images("v1")
    assert (v1.image_id, v1.layers, v1.tag) == (user.image_id, built.diff_ids, ref)

    guest = images.push("v1", registry, "os:latest")
    assert guest == f"10.0.2.2:{registry.address.rsplit(':', 1)[1]}/os:latest"
    pushed = f"docker://{registry.address}/os:latest"
    config = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--config", "--raw", pushed],
        capture_output=True,
        check=True,
    ).stdout
    # the registry holds the user's image: podman's image ID (the config's digest) is unchanged
    assert hashlib.sha256(config).hexdigest() == user.image_id
    seen = skopeo_json("inspect", "--tls-verify=false", pushed)
    layers = seen["Layers"]
    assert isinstance(layers, list) and len(layers) == len(built.layers), seen
    # asked again for the same tag: no second copy (the registry's digest stays)
    digest = seen["Digest"]
    images.push("v1", registry, "os:latest")
    assert skopeo_json("inspect", "--tls-verify=false", pushed)["Digest"] == digest
