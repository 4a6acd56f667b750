"""Reading JSON from files that may be damaged or hostile."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import CorruptSnapshotError


def no_duplicate_keys(where: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A ``json.loads`` object hook that refuses an object naming the same key twice (JSON allows it;
    two readers could then disagree on the value)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):  # rare: find the culprit only then
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise CorruptSnapshotError(f"duplicate key {key!r} in {where}")
                seen.add(key)
        return out

    return hook
