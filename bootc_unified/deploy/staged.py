"""`/run/composefs/staged-deployment`: the marker naming the staged deployment (bootc `BC/state.rs`).

    {"depl_id":"<id>","finalization_locked":false}

`finalization_locked` = download-only (status shows it as `downloadOnly`). Issue 10 writes it;
status reads it. The keys are bootc's own snake_case.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from bootc_unified.errors import UserError

MARKER = Path("/run/composefs/staged-deployment")


@dataclass(frozen=True)
class StagedMarker:
    depl_id: str
    finalization_locked: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def read(cls, path: Path = MARKER) -> StagedMarker | None:
        """The marker, or None when there is none."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise UserError(f"{path}: {e.strerror}") from e
        try:
            doc = json.loads(text)
            depl_id = doc["depl_id"]
            locked = doc.get("finalization_locked", False)
            if not isinstance(depl_id, str) or not isinstance(locked, bool):
                raise TypeError("wrong types")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{path}: not a staged-deployment marker ({e})") from e
        return cls(depl_id, locked)

    @classmethod
    def read_or_none(cls, path: Path = MARKER) -> StagedMarker | None:
        """The marker; None when there is none or it is garbled (it names nothing one could
        keep: for the verbs that replace or drop it, update and rollback)."""
        try:
            return cls.read(path)
        except UserError:
            return None

    def write(self, path: Path = MARKER) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
