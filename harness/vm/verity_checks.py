"""fs-verity checks of bootc_unified.verity against the kernel and the `fsverity` tool, written to
run in two places: on the host (tests/unit/test_verity.py, where the host kernel has fs-verity)
and in a guest (tests/vm/test_verity_guest.py copies this file there and runs it with the guest's
python3, against the guest's installed bootc_unified, on its ext4 and btrfs roots).

Self-contained on purpose: the standard library, bootc_unified and the `fsverity` command only.
As a script: `python3 verity_checks.py DIR` runs every check in DIR (created if missing) and prints
one JSON object with what it measured; a failed check exits non-zero with its assertion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bootc_unified import verity
from bootc_unified.verity import HashAlg


def fsverity_digest(path: Path, alg: str) -> str:
    """`fsverity digest` of `path` (the oracle), as hex."""
    out = subprocess.run(
        ["fsverity", "digest", f"--hash-alg={alg}", str(path)], check=True, capture_output=True, text=True
    ).stdout
    digest = out.split()[0]
    assert digest.startswith(f"{alg}:"), out
    return digest.split(":", 1)[1]


def enable_and_measure(directory: Path) -> dict[str, str]:
    """Per algorithm, a new file: measure says "not enabled", enable turns fs-verity on, measure
    returns the algorithm and the digest `fsverity digest` computes, a second enable says "already
    on". Returns {algorithm: path} of the verity files made."""
    made = {}
    for alg in (HashAlg.SHA256, HashAlg.SHA512):
        path = directory / f"verity-{alg.label}"
        path.write_bytes(os.urandom(10000))
        expected = fsverity_digest(path, alg.label)
        fd = os.open(path, os.O_RDONLY)
        try:
            assert verity.measure(fd) is None, f"{path}: fs-verity on before enable"
            assert verity.enable(fd, alg) is True, f"{path}: enable did not report turning fs-verity on"
            measured = verity.measure(fd)
            assert measured is not None, f"{path}: no fs-verity after enable"
            assert measured[0] is alg, (measured[0], alg)
            assert measured[1].hex() == expected, f"{path}: kernel {measured[1].hex()} != fsverity {expected}"
            assert verity.enable(fd, alg) is False, f"{path}: second enable did not report 'already on'"
        finally:
            os.close(fd)
        made[alg.label] = str(path)
    return made


def probe_agrees_with_kernel(directory: Path) -> dict[str, object]:
    """verity.probe() on an empty directory says what `fsverity enable` finds there, and leaves
    nothing behind. Returns the probe's answer."""
    directory.mkdir()
    sample = directory / "sample"
    sample.write_bytes(b"probe me")
    enabled = subprocess.run(["fsverity", "enable", str(sample)], capture_output=True, text=True)
    support = verity.probe(directory)
    assert support.supported == (enabled.returncode == 0), (support, enabled.stderr)
    if not support.supported:
        assert "fs-verity" in support.reason, support
    assert sorted(os.listdir(directory)) == ["sample"], os.listdir(directory)  # the probe left nothing
    return {"supported": support.supported, "reason": support.reason}


def main(argv: list[str]) -> int:
    directory = Path(argv[1])
    directory.mkdir(parents=True, exist_ok=True)
    results = {
        "probe": probe_agrees_with_kernel(directory / "probe"),
        "enable_and_measure": enable_and_measure(directory),
    }
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
