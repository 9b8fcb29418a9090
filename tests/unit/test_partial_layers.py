"""Layer records of zstd:chunked pulls, as measured (layers.json copied from the stores), and what
the reader makes of them: whether a layer was pulled partially and what the store lacks for it.

- podman 4.3 (Debian 12), partial pull: no `toc-digest`, the TOC kept as big data, diff-digest = the
  blob's compressed digest (the config's DiffID is another), no tar-split file;
- podman 5.4 (trixie), partial pull: `toc-digest`, diff-digest = the config's DiffID, a tar-split;
- podman 5.4, whole pull of gzip: compressed-diff-digest, diff-digest, a tar-split; not partial.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bootc_unified.cstorage import Layer, PartialLayerError
from bootc_unified.cstorage.records import LayerRecord

DIFF_ID_V1 = "sha256:b97c80596d52ec26a175ac1a20daa1f10078b1e1b7137c450f09fe63962da836"

PODMAN_43_PARTIAL: dict[str, object] = {
    "id": "45e51b0b1f7e8a3fe13a2ef2c3cf22b56d334ad193bfed24a0f2d338471f1fc7",
    "created": "2026-11-29T09:01:40.430677966Z",
    "diff-digest": "sha256:45e51b0b1f7e8a3fe13a2ef2c3cf22b56d334ad193bfed24a0f2d338471f1fc7",
    "big-data-names": ["zstd-chunked-manifest"],
}
PODMAN_54_PARTIAL: dict[str, object] = {
    "id": "b97c80596d52ec26a175ac1a20daa1f10078b1e1b7137c450f09fe63962da836",
    "created": "2026-11-29T09:14:43.131805975Z",
    "diff-digest": DIFF_ID_V1,
    "toc-digest": "sha256:2438152869742a0b16bed9149cf48def7be968f1b0899560041d3e70e6cfe9b8",
    "diff-size": 4746752,
    "uidset": [0],
    "gidset": [0],
    "big-data-names": ["zstd-chunked-manifest", "zstd-chunked-layer-data", "chunked-manifest-cache"],
}
PODMAN_54_WHOLE: dict[str, object] = {
    "id": "b97c80596d52ec26a175ac1a20daa1f10078b1e1b7137c450f09fe63962da836",
    "created": "2026-11-29T09:15:17.37741476Z",
    "compressed-diff-digest": "sha256:818b0caf264c6d3f07d988f18722085783a1dd0f67da248419b184690fd535f4",
    "compressed-size": 4746539,
    "diff-digest": DIFF_ID_V1,
    "diff-size": 4746752,
    "compression": 2,
    "uidset": [0],
    "gidset": [0],
}


def layer(record: dict[str, object], diff_id: str, tmp_path: Path, tar_split: bool) -> Layer:
    rec = LayerRecord.from_json(record, "layers.json")
    path = tmp_path / f"{rec.id}.tar-split.gz"
    if tar_split:
        path.write_bytes(b"")
    return Layer(rec.id, diff_id, rec.diff_size, tmp_path / "diff", path, rec)


def test_podman_43_partial_layer_lacks_tar_split_and_diff_id(tmp_path: Path) -> None:
    lay = layer(PODMAN_43_PARTIAL, DIFF_ID_V1, tmp_path, tar_split=False)
    assert lay.record.partial and lay.record.toc_digest is None
    assert lay.partial_gaps() == [
        "its tar-split",
        f"its DiffID (it records diff-digest {PODMAN_43_PARTIAL['diff-digest']}, not the config's)",
    ]
    with pytest.raises(PartialLayerError) as err:
        lay.check_complete()
    assert "\n" not in str(err.value) and DIFF_ID_V1 in str(err.value) and "zstd:chunked" in str(err.value)


def test_podman_54_partial_layer_is_complete(tmp_path: Path) -> None:
    lay = layer(PODMAN_54_PARTIAL, DIFF_ID_V1, tmp_path, tar_split=True)
    assert lay.record.partial and lay.record.toc_digest == PODMAN_54_PARTIAL["toc-digest"]
    assert lay.partial_gaps() == []
    lay.check_complete()
    assert lay.to_json()["partial"] is True


@pytest.mark.parametrize(
    ("drop", "gap"), [("diff-digest", "its DiffID (no diff-digest recorded)"), ("tar-split", "its tar-split")]
)
def test_podman_54_partial_layer_missing_a_piece(drop: str, gap: str, tmp_path: Path) -> None:
    record = {k: v for k, v in PODMAN_54_PARTIAL.items() if k != drop}
    lay = layer(record, DIFF_ID_V1, tmp_path, tar_split=drop != "tar-split")
    assert lay.partial_gaps() == [gap]
    with pytest.raises(PartialLayerError, match="lacks its"):
        lay.check_complete()


def test_whole_pull_is_not_partial(tmp_path: Path) -> None:
    lay = layer(PODMAN_54_WHOLE, DIFF_ID_V1, tmp_path, tar_split=False)
    assert not lay.record.partial
    assert lay.partial_gaps() == []  # a missing tar-split is reported when the tar is read
