"""What a restore reports back, and the progress callback it takes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..format.manifest import SnapshotInfo

ProgressFn = Callable[[int, int], None]


@dataclass
class RestoreReport:
    """What a restore did: each object, each RNG stream, the loop position, and what was missing
    or deliberately left alone (``skipped``, also in ``notes``)."""

    snapshot: SnapshotInfo
    restored: list[tuple[str, str]] = field(default_factory=list)  # (name, what it is)
    values: dict[str, Any] = field(default_factory=dict)
    rng: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def position(self) -> Any:
        return self.snapshot.position

    def describe(self) -> str:
        """A short plain-words report."""
        lines = []
        what = ", ".join(f"{name} ({kind})" for name, kind in self.restored) or "nothing"
        lines.append(f"restored {what}")
        if self.rng:
            lines.append(f"random number generators: {', '.join(self.rng)}")
        if self.snapshot.label:
            lines.append(f"loop position: {self.snapshot.label}")
        if self.missing:
            lines.append(f"not found in your session (run the cell that creates them first): {', '.join(self.missing)}")
        lines.extend(self.notes)
        return "; ".join(lines)
