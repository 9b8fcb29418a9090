"""`meta.json`: the repository's version, digest algorithm and features."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bootc_unified.errors import UserError
from bootc_unified.verity import HashAlg

VERSION = 1
FILENAME = "meta.json"


@dataclass(frozen=True)
class Meta:
    alg: HashAlg
    insecure: bool = False
    version: int = VERSION

    @property
    def algorithm(self) -> str:
        """composefs-rs's name for the object ID scheme, e.g. fsverity-sha512-12."""
        return f"fsverity-{self.alg.label}-12"

    def to_json(self) -> str:
        doc = {
            "version": self.version,
            "algorithm": self.algorithm,
            "features": {"insecure": self.insecure},
        }
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def parse(cls, text: str, where: Path) -> Meta:
        try:
            doc = json.loads(text)
            version = int(doc["version"])
            algorithm = str(doc["algorithm"])
            features = doc.get("features", {})
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{where}: not a valid repository meta.json ({e})") from e
        if version != VERSION:
            raise UserError(f"{where}: unsupported repository version {version} (this tool knows {VERSION})")
        prefix, _, rest = algorithm.partition("-")
        label, _, blockbits = rest.partition("-")
        if prefix != "fsverity" or blockbits != "12":
            raise UserError(f"{where}: unsupported algorithm {algorithm!r}")
        try:
            alg = HashAlg.from_name(label)
        except ValueError as e:
            raise UserError(f"{where}: unsupported algorithm {algorithm!r}") from e
        return cls(alg=alg, insecure=bool(features.get("insecure", False)), version=version)

    @classmethod
    def read(cls, repo: Path) -> Meta:
        path = repo / FILENAME
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UserError(f"{repo}: not a composefs repository (no {FILENAME})") from None
        except OSError as e:
            raise UserError(f"{path}: {e.strerror}") from e
        return cls.parse(text, path)

    def write(self, repo: Path) -> None:
        """Write meta.json atomically (tmpfile + rename), synced."""
        tmp = repo / f".{FILENAME}.tmp"
        with open(tmp, "w") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, repo / FILENAME)
