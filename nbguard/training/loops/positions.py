"""What a safe point reports and a resume plan carries: plain data the caller can store as JSON."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ...errors import RestoreError, UsageError
from .rewrite import LoopInfo


class LoopPosition(NamedTuple):
    """Where one active loop stood: ``completed`` iterations of its current activation were done;
    ``birth`` is what ``capture_birth`` returned when that activation's iterable was created;
    ``reused`` tells, per DataLoader the iterable iterated, whether that reused persistent workers
    (store it with the rest; None when unknown)."""

    loop_id: int
    completed: int
    birth: Any = None
    reused: tuple[bool, ...] | None = None


@dataclass(frozen=True)
class SafePoint:
    """Why the callback runs (``'timer'``, ``'interrupt'``, ``'every-iter'``...) and the active
    loops, outermost first; the last one has just completed an iteration."""

    reasons: set[str]
    positions: list[LoopPosition]
    #: (index in positions, function name, frame) of each function call on the path, at its
    #: outermost loop: where that function's local variables are read from.
    frames: list[tuple[int, str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ResumePlan:
    """Where to resume: the positions of a safe point, or ``completed=True`` for a run that ended."""

    positions: Sequence[LoopPosition] = ()
    completed: bool = False

    def __post_init__(self) -> None:
        if not self.positions and not self.completed:
            raise UsageError("a ResumePlan needs the positions of a safe point, or completed=True")
        positions = [p if isinstance(p, LoopPosition) else LoopPosition(*p) for p in self.positions]
        positions = [p._replace(loop_id=int(p.loop_id), completed=int(p.completed),
                                reused=None if p.reused is None else tuple(bool(r) for r in p.reused))
                     for p in positions]
        object.__setattr__(self, "positions", tuple(positions))


def check_plan(plan: ResumePlan, loops: list[LoopInfo], function_tops: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    """Refuse positions that cannot come from a safe point of this cell. A function's outermost
    loop (``function_tops``) may sit inside any loop: it nests where the function is called."""
    parent = None
    for position in plan.positions:
        known = 0 <= position.loop_id < len(loops)
        nests = known and (loops[position.loop_id].parent == parent or position.loop_id in function_tops)
        if not nests or position.completed < 0:
            path = [(p.loop_id, p.completed) for p in plan.positions]
            raise RestoreError(f"the snapshot's loop positions {path} do not fit this cell's {len(loops)} loops: it "
                               "was taken by another version of the cell. Run it again without resuming")
        parent = position.loop_id
