"""The runtime the rewritten cell calls into: loop positions, safe points and resume.

The rewritten code calls ``enter(id)`` before a loop's iterable is built and ``loop(id, iterable)``
to get the iterator the ``for`` statement runs on; nothing runs per iteration. Loops of functions
the cell calls (``functions``) nest where they are called: a function's outermost loop sits inside
the innermost loop its caller is running, so positions describe the whole call chain. A request
(``request_safe_point``, from any thread or a signal handler) only queues a reason and arms the
event of ``arming.py``; the callback runs at the next iteration end of any of the cell's loops, in
the thread running the cell.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from types import FrameType
from typing import Any

from ...errors import RestoreError, UsageError
from . import iterators
from .activation import Activation
from .arming import ends_of, make_arming
from .dataloaders import MODULE as DATALOADER_MODULE
from .dataloaders import LoaderPatch
from .positions import LoopPosition, ResumePlan, SafePoint, check_plan
from .rewrite import RESERVED_NAME, InstrumentedCell, InstrumentedFunction, Unit


class LoopRuntime:
    """Positions, safe points and resume for one execution of an instrumented cell.

    ``on_safe_point(SafePoint)`` runs in the thread executing the cell, at the end of an iteration,
    when a save was requested; it may raise (the exception surfaces in the cell at the loop header).
    ``capture_birth()`` runs each time a loop's iterable is about to be created; ``apply_birth(birth)``
    replaces it on the resume path. ``on_resume()`` runs once, where the plan's innermost loop has
    skipped its completed iterations. ``every_iter=N`` adds a safe point every N completed
    iterations of each top-level loop.
    """

    def __init__(
        self,
        cell: InstrumentedCell,
        *,
        functions: Sequence[InstrumentedFunction] = (),
        on_safe_point: Callable[[SafePoint], None],
        capture_birth: Callable[[], Any] | None = None,
        apply_birth: Callable[[Any], None] | None = None,
        resume: ResumePlan | None = None,
        on_resume: Callable[[], None] | None = None,
        every_iter: int | None = None,
    ):
        if every_iter is not None and (not isinstance(every_iter, int) or every_iter < 1):
            raise UsageError(f"every_iter must be a positive number of iterations, not {every_iter!r}")
        self.cell = cell
        self.functions = tuple(functions)
        units: tuple[Unit, ...] = (cell, *self.functions)
        self._loops = [info for unit in units for info in unit.loops]
        self._meta = [meta for unit in units for meta in unit.meta]
        if any(info.id != index for index, info in enumerate(self._loops)):
            raise UsageError("the functions' loops must be numbered on from the cell's, in order")
        self._unit_of: list[Unit] = [unit for unit in units for _ in unit.loops]
        self._unit_by_code: dict[int, Unit] = {id(unit.code): unit for unit in units}
        self._on_safe_point = on_safe_point
        self._capture_birth = capture_birth
        self._apply_birth = apply_birth
        self._on_resume = on_resume
        self._every = every_iter
        self._plan = resume
        if resume is not None:
            check_plan(resume, self._loops, {info.id for info in self._loops[len(cell.loops):] if info.parent is None})
        self._path = 0  # how many loops of the resume path were entered
        self._stack: list[Activation] = []  # index = depth; deeper entries may be stale
        self._window: Activation | None = None  # the loop whose iterable is being built
        self._reasons: collections.deque[str] = collections.deque()
        self._running = False
        self._firing = False
        self._arming = make_arming(ends_of(*((unit.code, unit.iteration_ends) for unit in units)), self._iteration_end)
        # Where a frame stands while a loop fetches its next item: 3.12+ may report the FOR_ITER's
        # inline cache entry instead of the instruction.
        steps = (0, 2) if sys.version_info >= (3, 12) else (0,)
        self._fetching = {id(unit.code): {offset + step: loop_id for offset, loop_id in unit.iteration_ends.items()
                                          for step in steps} for unit in units}
        self._loader_patch: LoaderPatch | None = None
        self.resumed = False
        self.safe_points = 0
        self.resumed_with_workers = False
        self.resume_warnings: list[str] = []

    # -- the caller's side ---------------------------------------------------------------------
    @contextlib.contextmanager
    def active(self) -> Iterator[LoopRuntime]:
        """Install what requests need for the time the cell runs; restore everything after."""
        if self._running:
            raise UsageError("this LoopRuntime is already running a cell")
        self._arming.install()
        for function in self.functions:
            function.install()
        try:
            self._patch_loaders()
            self._running = True
            yield self
            if self._plan is not None and not self._plan.completed and not self.resumed:
                where = self._describe(self._plan.positions[min(self._path, len(self._plan.positions) - 1)].loop_id)
                raise RestoreError(f"the cell ended without reaching the point to resume from ({where}); the cell or "
                                   "its data changed. Run it again without resuming")
        finally:
            self._running = False
            for function in self.functions:
                function.uninstall()
            self._arming.uninstall()
            if self._loader_patch is not None:
                self._loader_patch.uninstall()
                self._loader_patch = None
            self._reasons.clear()
            self._stack.clear()
            self._window = None

    def execute(self, namespace: MutableMapping[str, Any]) -> None:
        """``exec`` the cell in ``namespace`` (inside ``active()``), binding the reserved name."""
        namespace[RESERVED_NAME] = self
        exec(self.cell.code, namespace)  # type: ignore[arg-type]  # a dict (IPython's user_ns, a module's globals)

    def request_safe_point(self, reason: str = "request") -> None:
        """Ask for ``on_safe_point`` at the next iteration end. Thread-safe, signal-safe, cheap;
        ignored while the cell is not running."""
        if not self._running:
            return
        self._reasons.append(reason)
        if not self._firing:
            self._arming.arm()

    @property
    def pending(self) -> set[str]:
        """Reasons requested and not served yet."""
        return set(self._reasons.copy())

    # -- called by the rewritten cell ----------------------------------------------------------
    def enter(self, loop_id: int) -> bool:
        """Before a loop's iterable is built. False: skip the loop (resume)."""
        info = self._loops[loop_id]
        stack = self._stack
        frame = sys._getframe(1)
        if info.parent is not None:
            depth = self._index_of(info.parent) + 1
        elif self._unit_of[loop_id] is self.cell:
            depth = 0
        else:
            depth = self._base_depth(frame.f_back)
        del stack[depth:]
        self._window = None
        if self._loader_patch is None and DATALOADER_MODULE in sys.modules:
            self._patch_loaders()
        if self._reasons and not self._arming.armed and not self._firing:
            self._arming.arm()  # a request left over by a callback that raised
        activation = Activation(info, self._meta[loop_id], depth, frame)
        if self._plan is not None:
            if not self._enter_resumed(activation):
                return False
        elif self._capture_birth is not None:
            activation.birth = self._capture_birth()
        stack.append(activation)
        self._window = activation
        return True

    def loop(self, loop_id: int, iterable: Any) -> Iterator[Any]:
        """The iterator the loop's ``for`` statement runs on."""
        activation = self._stack[-1] if self._stack else None
        if activation is None or activation.info.id != loop_id:
            raise UsageError(f"nbguard: loop {loop_id} started without enter(); was the cell rewritten by another tool?")
        try:
            it = activation.counted(iterable)
            if activation.plan is not None:
                self._skip(activation, it)
                if self._path == len(self._plan.positions):  # type: ignore[union-attr]
                    self._finish_resume()
            if self._every is not None and activation.depth == 0:
                it = self._every_iter(activation, it)
            return it
        finally:
            activation.skipping = False
            self._window = None

    def stop(self, loop_id: int) -> None:
        """A rewritten while loop's condition turned false: end its counter so its else clause runs."""
        self._stack[self._index_of(loop_id)].stopped = True

    def skipped_else(self, loop_id: int) -> bool:
        """Whether the else clause of a loop skipped on resume holds the resume point."""
        span = self._meta[loop_id].else_loops
        plan = self._plan
        if span is None or plan is None or plan.completed or self._path >= len(plan.positions):
            return False
        return span[0] <= plan.positions[self._path].loop_id <= span[1]

    # -- safe points -----------------------------------------------------------------------------
    # -- where a loop sits in the call chain ----------------------------------------------------
    def _index_of(self, loop_id: int) -> int:
        """Stack index of the innermost activation of ``loop_id``; -1 when it is not on the stack."""
        stack = self._stack
        for index in range(len(stack) - 1, -1, -1):
            if stack[index].info.id == loop_id:
                return index
        return -1

    def _base_depth(self, frame: FrameType | None) -> int:
        """Where a function's outermost loop nests: one below the innermost loop that its nearest
        instrumented caller is running (0 when none is)."""
        while frame is not None:
            unit = self._unit_by_code.get(id(frame.f_code))
            if unit is not None and unit.code is frame.f_code:
                line = frame.f_lineno
                enclosing = [info for info, meta in zip(unit.loops, unit.meta, strict=True)
                             if meta.body[0] <= line <= meta.body[1]]
                for info in sorted(enclosing, key=lambda i: -i.depth):
                    index = self._index_of(info.id)
                    if index >= 0:
                        return index + 1
                if unit is self.cell:
                    return 0
            frame = frame.f_back
        return 0

    @property
    def frames(self) -> list[tuple[int, str, FrameType]]:
        """(stack index, function name, frame) of each function call on the current loop path, at
        its outermost loop: where the function's local variables live."""
        return [(index, self._unit_of[a.info.id].name, a.frame) for index, a in enumerate(self._stack)
                if a.info.parent is None and a.frame is not None and self._unit_of[a.info.id] is not self.cell]

    def _iteration_end(self, loop_id: int) -> None:
        """From the armed event: the loop's next item is about to be fetched."""
        depth = self._index_of(loop_id)
        stack = self._stack
        if depth < 0 or stack[depth].stopped or self._firing:
            return  # not the end of a live iteration: stay armed
        if self._every is not None and depth == 0:
            done = stack[0].consumed()
            if done and done % self._every == 0:
                return  # the every-iter wrapper fires right here and takes the pending reasons along
        del stack[depth + 1:]
        self._fire(depth, set())

    def _fire(self, depth: int, reasons: set[str]) -> None:
        self._arming.disarm()
        while self._reasons:
            reasons.add(self._reasons.popleft())
        if not reasons:
            return
        positions = []
        for index, activation in enumerate(self._stack[:depth + 1]):
            done = activation.consumed() - (0 if index == depth else 1)
            reused = tuple(activation.reused)
            positions.append(LoopPosition(activation.info.id, done, activation.birth, reused))
        self.safe_points += 1
        self._firing = True
        try:
            self._on_safe_point(SafePoint(reasons, positions, [f for f in self.frames if f[0] <= depth]))
        finally:
            self._firing = False
        if self._reasons and self._running:
            self._arming.arm()

    def _every_iter(self, activation: Activation, it: Iterator[Any]) -> Iterator[Any]:
        every = self._every
        for item in it:
            yield item
            done = activation.consumed()
            if done % every == 0:  # type: ignore[operator]
                del self._stack[1:]
                self._fire(0, {"every-iter"})

    # -- resume ------------------------------------------------------------------------------
    def _enter_resumed(self, activation: Activation) -> bool:
        plan = self._plan
        assert plan is not None
        info = activation.info
        if plan.completed:
            if not self.resumed:
                self._finish_resume()
            return False
        target = plan.positions[self._path]
        depth = activation.depth
        parent = self._stack[depth - 1] if depth else None
        inside_path = depth == self._path and (
            parent is None or (parent.plan is not None and parent.consumed() == parent.plan.completed + 1))
        other_unit = self._unit_of[info.id] is not self._unit_of[target.loop_id]
        if inside_path and (info.id < target.loop_id or (other_unit and info.parent is None)):
            return False  # an earlier loop of the same iteration (or of a function called before): it had finished
        if not inside_path or info.id != target.loop_id:
            raise RestoreError(f"cannot resume: the snapshot was taken in {self._describe(target.loop_id)}, but the "
                               f"re-run reached {self._describe(info.id)} instead; the cell or its data changed. "
                               "Run it again without resuming, or resume from another snapshot")
        activation.plan = target
        activation.birth = target.birth
        activation.skip = target.completed if info.kind == "for" else 0
        activation.skipping = True
        self._path += 1
        if self._apply_birth is not None:
            self._apply_birth(target.birth)
        return True

    def _skip(self, activation: Activation, it: Iterator[Any]) -> None:
        count = activation.skip
        if count == 0:
            return
        self._window = activation  # DataLoaders iterated while skipping belong to this loop
        if not iterators.skip_fast(it, count):
            for done in range(count):
                activation.skipped = done
                try:
                    next(it)
                except StopIteration:
                    break
            activation.skipped = count
        got = activation.consumed()
        if got != count:
            raise RestoreError(f"cannot resume {self._describe(activation.info.id)}: the snapshot was taken after "
                               f"{count} iterations but its iterable now has only {got}; the cell or its data "
                               "changed. Run it again without resuming")

    def _finish_resume(self) -> None:
        if self._plan is not None and not self._plan.completed:
            self._plan = None
        self.resumed = True
        if self._on_resume is not None:
            self._on_resume()

    # -- DataLoaders ---------------------------------------------------------------------------
    def _patch_loaders(self) -> None:
        if DATALOADER_MODULE in sys.modules and self._loader_patch is None:
            self._loader_patch = LoaderPatch(self)
            self._loader_patch.install()

    def _attribute(self, loader: Any, passes_through: Callable[[FrameType, Any], bool]) -> tuple[Activation, bool] | None:
        """The loop whose iterable is iterating ``loader`` right now (None: some other code), and
        whether the batches reach it unchanged."""
        frame: FrameType | None = sys._getframe(2)
        unchanged = True
        while frame is not None and id(frame.f_code) not in self._fetching:
            unchanged = unchanged and passes_through(frame, loader)
            frame = frame.f_back
        if frame is None:
            return None
        loop_id = self._fetching[id(frame.f_code)].get(frame.f_lasti)
        activation: Activation | None = None
        if loop_id is not None:  # the loop fetches an item and its iterable starts the loader lazily
            index = self._index_of(loop_id)
            if index >= 0:
                activation = self._stack[index]
        elif self._window is not None and self._window.frame is frame:
            first, last = self._window.meta.header
            if first <= frame.f_lineno <= last:
                activation = self._window
        if activation is None:
            return None
        return activation, unchanged and activation.meta.placeholders_ok

    def _note_workers(self, activation: Activation, loader: Any, skipped: bool) -> None:
        self.resumed_with_workers = True
        what = "skipped batches never reached its workers" if skipped else "its persistent workers were restarted"
        self.resume_warnings.append(
            f"{self._describe(activation.info.id)} resumed a DataLoader with num_workers={loader.num_workers}: {what}, "
            "so random transforms inside the workers can differ from an uninterrupted run for the rest of this epoch")

    def _describe(self, loop_id: int) -> str:
        info = self._loops[loop_id]
        unit = self._unit_of[loop_id]
        where = f" in {unit.name}()" if unit is not self.cell else ""
        return f"the {info.kind} loop of line {info.lineno}{where}"
