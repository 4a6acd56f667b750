"""One activation of a loop, from ``enter`` until the loop is left, and how its iterations are counted.

The runtime keeps a stack of activations, one per loop on the current path (the cell's loops and
those of the functions it calls). ``counted`` gives the iterator the loop's statement runs on, set
up so that ``consumed()`` reads how many iterations were done: a for loop's own iterator, read in
place when it tells its position (``iterators.readable``) or wrapped in a counter otherwise; a
while loop's counter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from . import iterators
from .positions import LoopPosition
from .rewrite import LoopInfo, LoopMeta


@dataclass(eq=False, slots=True)
class Activation:
    """One activation of a loop: from ``enter`` until the loop is left."""

    info: LoopInfo
    meta: LoopMeta
    depth: int = 0  # index in the stack: loops of the caller chain enclosing it
    frame: FrameType | None = None  # the frame running the loop (a function's, or the cell's)
    birth: Any = None
    src: Any = None  # what positions are read from
    reader: Callable[[Any], int] | None = None
    offset: int = 0
    reused: list[bool] = field(default_factory=list)
    plan: LoopPosition | None = None  # on the resume path
    skip: int = 0
    skipped: int = 0
    skipping: bool = False
    stopped: bool = False  # a while loop whose condition turned false
    ticks: int = 0

    def consumed(self) -> int:
        """Iterations started since the loop began (or since the position it resumed at)."""
        return self.reader(self.src) - self.offset if self.reader is not None else 0

    def counted(self, iterable: Any) -> Iterator[Any]:
        """The iterator the loop runs on: ``iterable``'s for a for loop, a counter for a while loop."""
        if self.info.kind != "for":
            return self._while_counter()
        it = iter(iterable)
        readable = iterators.readable(it)
        if readable is None:
            it, self.src = iterators.counted(it)
            self.reader, self.offset = iterators.counter_reader()
        else:
            self.src = it
            self.reader, self.offset = readable
        return it

    def _while_counter(self) -> Iterator[Any]:
        start = self.plan.completed if self.plan is not None else 0
        if not self.meta.has_else:
            it, self.reader, self.offset = iterators.ticks(start)
            self.src = it
            return it
        self.src, self.reader, self.ticks = self, _ticks_count, start
        return _until_stopped(self)


def _ticks_count(activation: Activation) -> int:
    return activation.ticks


def _until_stopped(activation: Activation) -> Iterator[tuple[()]]:
    while not activation.stopped:
        activation.ticks += 1
        yield ()
