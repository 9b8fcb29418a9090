"""Objects and bytes by method (reflinked, hardlinked, copied, already present) for one import."""

from __future__ import annotations

from dataclasses import dataclass, field

from bootc_unified.repository.objects import Method, ObjectResult


@dataclass
class MethodCount:
    objects: int = 0
    bytes: int = 0


@dataclass
class ImportStats:
    by_method: dict[Method, MethodCount] = field(default_factory=lambda: {m: MethodCount() for m in Method})

    def record(self, result: ObjectResult) -> None:
        count = self.by_method[result.method]
        count.objects += 1
        count.bytes += result.size

    def merge(self, other: ImportStats) -> None:
        for method, count in other.by_method.items():
            mine = self.by_method[method]
            mine.objects += count.objects
            mine.bytes += count.bytes

    @property
    def objects(self) -> int:
        return sum(c.objects for c in self.by_method.values())

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.by_method.values())

    @property
    def copied_bytes(self) -> int:
        return self.by_method[Method.COPIED].bytes

    def to_json(self) -> dict[str, dict[str, int]]:
        return {m.value: {"objects": c.objects, "bytes": c.bytes} for m, c in self.by_method.items()}
