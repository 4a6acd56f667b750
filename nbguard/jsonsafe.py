"""Reading JSON from files that may be damaged or hostile."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import CorruptSnapshotError


def no_duplicate_keys(where: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A ``json.loads`` object hook that refuses an object naming the same key twice (JSON allows it;
    two readers could then disagree on the value)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise CorruptSnapshotError(f"duplicate key {key!r} in {where}")
            out[key] = value
        return out

    return hook
