"""Logically bound images: bound-images.d parsing on a directory and on a composefs EROFS image.

Oracles: the unit files and symlinks written here (the expected Image= values are spelled out by
hand), and the same answers from a directory tree and from the EROFS image our writer makes of it
(read back without mounting, large files' data from a dict of objects keyed by fs-verity digest).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bootc_unified.deploy.lbi import (
    BoundImage,
    bound_images_of_dir,
    bound_images_of_erofs,
    expand_specifiers,
    normalize,
    parse_unit,
)
from bootc_unified.erofs import from_directory, write_image
from bootc_unified.errors import UserError
from bootc_unified.verity import HashAlg, digest_bytes

D = "usr/lib/bootc/bound-images.d"
Q = "usr/share/containers/systemd"


def tree(root: Path, files: dict[str, str], links: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for rel, target in links.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, root / rel)
    return root


def via_erofs(root: Path) -> list[BoundImage]:
    objects: dict[str, bytes] = {}

    def object_id_of(p: Path) -> str:
        data = p.read_bytes()
        oid = digest_bytes(data, HashAlg.SHA512).hex()
        objects[oid] = data
        return oid

    image = write_image(from_directory(root, object_id_of), HashAlg.SHA512)
    return bound_images_of_erofs(image, objects.__getitem__)


def test_image_and_container_files(tmp_path: Path) -> None:
    padding = "# " + "x" * 200 + "\n"  # larger than the inline limit: data comes from an object
    root = tree(
        tmp_path / "root",
        {
            f"{Q}/app.image": padding + "[Unit]\nDescription=x\n\n[Image]\nImage=quay.io/ex/app:1\n",
            f"{Q}/web.container": "[Container]\n; comment\nImage=registry.example.com/web\\\n\nExec=x\n",
            f"{Q}/pct.image": "[Image]\nImage=localhost/a%%b:2\n",
        },
        {
            f"{D}/10-app.image": f"/{Q}/app.image",  # absolute: resolved inside the root
            f"{D}/20-web.container": "../../../share/containers/systemd/web.container",
            f"{D}/30-pct.image": f"/../../{Q}/pct.image",  # `..` above the root stays at the root
        },
    )
    want = [
        BoundImage("quay.io/ex/app:1", f"/{D}/10-app.image"),
        BoundImage("registry.example.com/web", f"/{D}/20-web.container"),
        BoundImage("localhost/a%b:2", f"/{D}/30-pct.image"),
    ]
    assert bound_images_of_dir(root) == want
    assert via_erofs(root) == want
    assert [b.name for b in want] == [
        "quay.io/ex/app:1",
        "registry.example.com/web:latest",
        "localhost/a%b:2",
    ]


def test_no_bound_images(tmp_path: Path) -> None:
    (tmp_path / "usr").mkdir()
    assert bound_images_of_dir(tmp_path) == []
    assert via_erofs(tmp_path) == []


@pytest.mark.parametrize(
    ("files", "links", "needle"),
    [
        ({f"{D}/a.image": "[Image]\nImage=quay.io/a:1\n"}, {}, f"/{D}/a.image: not a symlink"),
        ({f"{Q}/a.txt": "x"}, {f"{D}/a.txt": f"/{Q}/a.txt"}, f"/{D}/a.txt: not a .image or .container"),
        ({}, {f"{D}/a.image": f"/{Q}/missing.image"}, f"/{D}/a.image: symlink target /{Q}/missing.image"),
        (
            {f"{Q}/a.image": "[Image]\nImage=quay.io/a:1\nAuthFile=/etc/auth.json\n"},
            {f"{D}/a.image": f"/{Q}/a.image"},
            f"/{D}/a.image: AuthFile= is not supported",
        ),
        (
            {f"{Q}/a.image": "[Image]\nImage=quay.io/%u/a:1\n"},
            {f"{D}/a.image": f"/{Q}/a.image"},
            f"/{D}/a.image: systemd specifier %u",
        ),
        (
            {f"{Q}/a.container": "[Image]\nImage=quay.io/a:1\n"},
            {f"{D}/a.container": f"/{Q}/a.container"},
            f"/{D}/a.container: no Image= in [Container]",
        ),
        (
            {f"{Q}/a.image": "[Image]\nImage=app:1\n"},
            {f"{D}/a.image": f"/{Q}/a.image"},
            f"/{D}/a.image: Image=app:1: not a fully qualified image reference",
        ),
        ({}, {f"{D}/a.image": "a.image"}, f"/{D}/a.image: too many levels of symbolic links"),
    ],
    ids=["not-symlink", "extension", "dangling", "authfile", "specifier", "section", "short-name", "loop"],
)
def test_bad_entries_one_line(
    tmp_path: Path, files: dict[str, str], links: dict[str, str], needle: str
) -> None:
    root = tree(tmp_path / "root", files, links)
    for read in (bound_images_of_dir, via_erofs):
        with pytest.raises(UserError) as e:
            read(root)
        assert needle in str(e.value) and "\n" not in str(e.value), (read, str(e.value))


def test_specifiers_and_names() -> None:
    assert expand_specifiers("a%%b%%", "f") == "a%b%"
    for bad in ("%", "a%n", "%%%h"):
        with pytest.raises(UserError, match="specifier"):
            expand_specifiers(bad, "f")
    assert parse_unit("[Image]\nImage=quay.io/a:1\nImage=quay.io/b:2\n", "Image", "f") == "quay.io/b:2"
    assert parse_unit("[Container]\nAuthFile=x\nImage=quay.io/a\n", "Container", "f") == "quay.io/a"
    assert normalize("docker://quay.io/a") == "quay.io/a:latest"
    assert normalize("localhost:5000/a") == "localhost:5000/a:latest"
    assert normalize("quay.io/a@sha256:" + "0" * 64) == "quay.io/a@sha256:" + "0" * 64
