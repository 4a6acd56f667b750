"""A guarded cell run: find the state, resume where the run stopped, save at safe points.

``CheckpointedCell`` is what ``%%checkpointed`` calls, and it needs no IPython: it takes the
cell's source, the namespace it runs in, and the options. The loops of the cell are rewritten
(``loops``) so that a timer, an interrupt or a shutdown request only sets a flag and the save
happens at the end of the current iteration.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import MutableMapping
from typing import Any

import numpy as np
import torch

from ..engine.snapshot import Snapshot
from ..errors import NbguardError, RestoreError
from ..format.manifest import SnapshotInfo
from ..humanize import ago
from . import position_text
from .budget import Budget, TimeBudgetReached
from .discover import Discovery, discover, why_not_plain
from .frame_state import capture_locals
from .loop_names import loop_labels, loop_targets
from .loop_progress import exhausted_top_loop, loop_total, state_mark, top_progress
from .loops import LoopPosition, LoopRuntime, instrument_cell
from .loops.reach import reach
from .loops.rewrite import loop_structure
from .options import CellOptions
from .resume_choice import CodeVersion, choose, extra_of
from .resuming import LoopBirths, restore_snapshot, resume_plan, say_restored
from .session import Session
from .triggers import SafePointTriggers, exit_after_save

RESULT_NAME = "__nbguard_result__"  # where a guarded function call (nbguard.checkpointed) leaves its result
RESULT_KEY = "nbguard.result"  # ... and the name a plain result is saved under (never a notebook variable)
DURABLE_WAIT = 60.0  # at most this long for the budget's last snapshot to reach Drive (or the mount)


class StopAfterSave(KeyboardInterrupt):
    """Raised at the safe point after an interrupt's snapshot was taken; its text says so."""


class CheckpointedCell:
    """One execution of a guarded cell."""

    def __init__(self, source: str, namespace: MutableMapping[str, Any], options: CellOptions, session: Session,
                 *, run: str, filename: str = "<checkpointed>", entry: Any = None):
        self.source = source
        self.namespace = namespace
        self.options = options
        self.session = session
        self.report = session.report
        self.run_name = run
        self.cell = instrument_cell(source, filename=filename)
        # Loops of the notebook's functions the cell calls are safe points too (train_loop(), train_model()).
        self.entries = [entry] if entry is not None else []
        self.reach = reach(self.cell.tree, namespace, first_id=len(self.cell.loops), entries=self.entries)
        self.local_skip = frozenset().union(*(f.targets for f in self.reach.functions))
        self.code = CodeVersion(self.cell.fingerprint, loop_structure(self.cell.loops), self.reach.versions)
        self.origin: str | None = None  # the snapshot a --resume-from started this lineage at
        self.edited: list[str] = []  # the code that differs from the snapshot resumed ('the cell', 'train()')
        self.budget: Budget | None = session.budget_for(options)
        self._final_progress: list[tuple[str, int, int | None]] = []
        self._final_loops: list[list[Any]] | None = None  # where an edited cell with more iterations continues
        self.continues_finished = False
        self._restored_mark: Any = None  # the state as restored from a finished run's snapshot
        self.guard = session.guard(options, run)
        self.location = session.store_location(options)
        self.labels = loop_labels(source, self.cell.loops)
        self.loop_targets = loop_targets(source)
        self.discovery: Discovery | None = None
        self.runtime: LoopRuntime | None = None
        self.saves = 0
        self.resumed_from: SnapshotInfo | None = None
        self.triggers: SafePointTriggers | None = None
        self._shutdown = False
        self._said_captured = False
        self.finished = False
        self.result: Any = None  # what a guarded function returned (nbguard.checkpointed)
        self.births = LoopBirths(lambda: self._discover().objects)

    # -- state -------------------------------------------------------------------------------
    def _discover(self) -> Discovery:
        self.discovery = discover(self.source, self.namespace, include=self.options.state,
                                  exclude=self.options.exclude, entries=self.entries)
        return self.discovery

    def state(self) -> dict[str, Any]:
        """Name → live object or value, as the cell knows them now."""
        discovery = self._discover()
        state = dict(discovery.objects)
        for name in discovery.values:
            if name not in self.namespace:
                continue
            value = self.namespace[name]
            if name in self.loop_targets and isinstance(value, torch.Tensor | np.ndarray | tuple | list):
                continue  # a batch: the next iteration loads the next one anyway
            state[name] = value
        return state

    def metrics(self, state: dict[str, Any], *, with_best: bool = True) -> dict[str, float]:
        """Float variables of the cell, for the panel's chart; the ``--best`` variable only when
        ``with_best`` (mid-epoch its value belongs to weights of an earlier epoch)."""
        out: dict[str, float] = {}
        if self.options.best:
            name = self.options.best[0]
            if name not in self.namespace:
                self.report_once(f"best:{name}", f"--best {name}: there is no variable {name!r} in the notebook yet; "
                                                 "snapshots are ranked once the cell assigns it")
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
                value = value.item()
            if type(value) is float and name not in self.loop_targets:
                out[name] = value
        if self.options.best:
            out.pop(self.options.best[0], None)
        if with_best and self.options.best and self.options.best[0] in self.namespace:
            value = self.namespace[self.options.best[0]]
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if type(value) in (int, float):
                out[self.options.best[0]] = value
        return dict(list(out.items())[:12])

    def report_once(self, key: str, message: str) -> None:
        self.guard.say_once(key, message)

    # -- saving --------------------------------------------------------------------------------
    def save(self, positions: list[LoopPosition] | None, *, completed: bool = False, tags: tuple[str, ...] = (),
             note: str | None = None, wait: bool = False, frames: list | None = None, unless_same: bool = False):
        state = self.state()
        if frames:
            state.update(capture_locals(frames, state, self.local_skip))
        if not self._said_captured and self.discovery is not None:
            self._said_captured = True
            self.report(self.discovery.describe())
        loops = [[p.loop_id, p.completed, p.birth, list(p.reused) if p.reused is not None else None]
                 for p in positions or []]
        position: dict[str, Any] = {}
        for index, p in enumerate(positions or []):
            label = self._label(index, p.loop_id)
            position[label if label not in position else f"{label}{index + 1}"] = p.completed
        if completed:
            position["completed"] = True
        text = self._position_text(positions, completed)
        if text:
            position["label"] = text
        if completed and RESULT_NAME in self.namespace:
            state, result = self._with_result(state)
        else:
            result = None
        extra = {**self.code.record(), "loops": loops,
                 "completed": completed, "origin": self.origin, "result": result,
                 # other names of saved objects ('model' for 'model_ft'): a re-run may know only those yet
                 "aliases": dict(self.discovery.aliases) if self.discovery is not None else {}}
        if completed and self._final_loops:
            extra["final_loops"] = self._final_loops
        at_epoch_end = positions is None or len(positions) <= 1
        handle = self.guard.save(state, metrics=self.metrics(state, with_best=at_epoch_end), position=position, note=note,
                                 tags=tags, extra=extra, wait=wait, unless_same=unless_same)
        self.saves += 1
        return handle

    def _label(self, depth: int, loop_id: int) -> str:
        """A loop's name in positions: the cell's loops by their variables ('epoch', 'batch', 'step'),
        a function's loops by where they sit in the call chain."""
        return self.labels.get(loop_id) or {0: "epoch", 1: "batch"}.get(depth, f"loop{depth + 1}")

    def _with_result(self, state: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """A guarded function's result, for a re-run of a finished run: the name of the saved object
        it is, or a plain value saved under RESULT_NAME; None when it can be neither."""
        value = self.namespace[RESULT_NAME]
        for name, obj in state.items():
            if obj is value and not isinstance(value, (int, float, str, bool, type(None))):
                return state, name
        if why_not_plain(value) is None:
            return {**state, RESULT_KEY: value}, RESULT_KEY
        return state, None

    def _position_text(self, positions: list[LoopPosition] | None, completed: bool) -> str:
        """'in epoch 3, after batch 27 of 48'; 'finished 5 of 5 epochs' for the final snapshot."""
        if completed:
            return position_text.describe(self._final_progress, finished=True)
        done = []
        for depth, p in enumerate(positions or []):
            total = loop_total(self.runtime, depth, p.loop_id)
            done.append((self._label(depth, p.loop_id), p.completed, total))
        return position_text.describe(done)

    def _on_safe_point(self, point) -> None:
        reasons = set(point.reasons)
        interrupted = "interrupt" in reasons or "shutdown" in reasons
        stopping = interrupted or "budget" in reasons
        if reasons <= {"timer", "retake"} and self.guard.busy:
            if self.triggers is not None:  # coalesce: the timer thread asks again once the writer is free
                self.triggers.retry_when_free = True
            return
        tags = ("interrupted",) if interrupted else ("budget",) if "budget" in reasons else ()
        self.save(point.positions, tags=tags, wait=stopping, frames=point.frames)
        if "shutdown" in reasons:
            exit_after_save(self.guard, self.report)
        if "interrupt" in reasons:
            raise StopAfterSave(f"interrupted — saved snapshot {self._last_text(brief=True)}. Run the cell again to "
                                "continue from there")
        if "budget" in reasons:
            # Waiting a little past the budget is better than a session ending on a snapshot not yet in
            # Drive: a platform's own limit is further away (SAFETY), and a user's budget leaves room.
            durable = self.session.make_durable(self.guard, max(DURABLE_WAIT, self.budget.left() if self.budget else 0))
            raise TimeBudgetReached(
                f"the time budget of {self.budget.text() if self.budget else '?'} is nearly used up: saved snapshot "
                f"{self._last_text(brief=True)}{'' if durable else ' (not confirmed durable yet)'} and stopped. In a "
                "new session run the notebook again (Run all): this cell continues from there (to go on in this "
                "session anyway: --budget off)")

    def save_if_changed(self, reason: str = "manual") -> bool:
        """A final snapshot when the guarded objects changed since the last one (used at shutdown).
        One snapshot per state: a finished run restored as it was is not saved again."""
        if self.guard.last_saved is None:
            return False
        state = self.state()
        if self._restored_mark is not None and state_mark(state) == self._restored_mark:
            return False
        if not self.guard.changed_since_last(state):
            return False
        before = self.guard.last_saved
        self.save(None, completed=self.finished, tags=(reason,), wait=True, unless_same=True)
        return self.guard.last_saved is not before

    # -- resume --------------------------------------------------------------------------------
    def _find_resume(self) -> tuple[Snapshot | None, list[str]]:
        start_point = self.session.start_points.pop((self.location, self.run_name), None)
        choice = choose(self.guard.catalog, self.run_name, code=self.code, fresh=self.options.fresh,
                        resume_from=self.options.resume_from, start_point=start_point, spelling=self.options.spelling)
        self.origin = choice.origin
        self.edited = choice.edited
        self.continues_finished = choice.continues_finished
        return choice.snapshot, choice.notes

    def _restore(self, snapshot: Snapshot) -> None:
        runtime = self.runtime
        report = restore_snapshot(snapshot, self._discover().objects, self.namespace,
                                  runtime.frames if runtime is not None else [], self.guard, self.options.spelling)
        self.resumed_from = snapshot.info
        # The restored snapshot is the base of the next one: unchanged tensors are not written again.
        say_restored(snapshot.info, report,
                     finished=bool(extra_of(snapshot).get("completed")) and not self.continues_finished,
                     edited=self.edited,
                     workers_resumed=runtime is not None and getattr(runtime, "resumed_with_workers", False),
                     spelling=self.options.spelling)

    # -- running -------------------------------------------------------------------------------
    def request_shutdown(self) -> None:
        self._shutdown = True
        if self.runtime is not None:
            self.runtime.request_safe_point("shutdown")

    def _save_final(self) -> None:
        """The snapshot that marks the run finished. One snapshot per state: when nothing changed since
        this run's last snapshot (taken at the end of the last iteration), that one is superseded by the
        final one and removed, instead of both using up keep slots."""
        self.guard.flush()
        previous = self.guard.last_saved if self.saves else None
        same = previous is not None and not previous.tags and not previous.pinned \
            and not self.guard.changed_since_last(self.state())
        policy = self.guard.policy
        if same:  # retention must not drop an older snapshot for the one about to be removed
            self.guard.policy = dataclasses.replace(policy, keep=policy.keep + 1)
        try:
            self.save(None, completed=True, tags=("final",), wait=True)
        finally:
            self.guard.policy = policy
        last = self.guard.last_saved
        if same and previous is not None and last is not None and last.id != previous.id:
            try:
                self.guard.catalog.delete(previous.id, previous.run)
            except NbguardError:
                pass  # already gone (retention): nothing to supersede

    def run(self) -> None:
        """Execute the cell under guard. Exceptions of the cell propagate (after a message)."""
        __tracebackhide__ = True
        self.guard.flush()  # a save of the previous run may still be in flight
        snapshot, problems = self._find_resume()
        for problem in problems:
            self.report(problem)
        reachable = bool(self.cell.loops or self.reach.functions)
        if not reachable:
            self._say_unreachable()
            if snapshot is not None and not extra_of(snapshot).get("completed"):
                self._said(f"snapshot {snapshot.info.id} was taken while this cell ran; nbguard cannot resume inside "
                           f"a loop it cannot reach, so the cell runs from the start (`%nbguard restore "
                           f"{snapshot.info.id}` loads that state instead)")
                snapshot = None
        plan = resume_plan(snapshot, continues_finished=self.continues_finished) if snapshot is not None else None
        if snapshot is not None and plan is not None and plan.completed and not self.cell.loops:
            # The loops live in functions: running the cell again would run the code after their loops
            # with fresh local variables (best weights loaded from the start). The final state is all.
            self.session.last_cell = self
            self._restore(snapshot)
            self.finished = True
            result = extra_of(snapshot).get("result")
            if result is not None:
                self.result = self.namespace.pop(RESULT_KEY, None) if result == RESULT_KEY else \
                    self._discover().objects.get(result, self.namespace.get(result))
            return
        try:
            self.guard.prepare(self.state())  # staging memory warmed up beside the first iterations
        except NbguardError:
            pass  # whatever stops a save is reported by that save
        self.runtime = LoopRuntime(
            self.cell,
            functions=self.reach.functions,
            on_safe_point=self._on_safe_point,
            capture_birth=self.births.capture,
            apply_birth=self.births.apply,
            resume=plan,
            on_resume=(lambda: self._restore(snapshot)) if snapshot is not None else None,
            every_iter=self.options.every_iter,
        )
        self.session.running_cell = self
        self.session.last_cell = self
        runtime = self.runtime
        triggers = self.triggers = SafePointTriggers(runtime, self.guard, every=self.options.every, budget=self.budget)
        # Without a safe point an interrupt stops the cell at once (KeyboardInterrupt), saved below.
        triggers.start(sigint=reachable)
        self.guard.on_retake = lambda: runtime.request_safe_point("retake")  # a save found stale bytes
        try:
            with self.runtime.active():
                self.runtime.execute(self.namespace)
                self._final_progress = top_progress(self.runtime, self.labels)
                self._final_loops = exhausted_top_loop(self.runtime)
            if plan is None or not plan.completed:
                self._save_final()
            elif self.runtime.resumed:  # a finished run restored as it was: its final snapshot stands
                self._restored_mark = state_mark(self.state())
            self.finished = True
            self.result = self.namespace.get(RESULT_NAME)
        except StopAfterSave:
            raise
        except KeyboardInterrupt:
            if not reachable:
                self.save(None, tags=("interrupted",), wait=True)
                self._said(f"interrupted — saved the state as it was{self._last_text()} (the cell starts from the "
                           "beginning when run again; `%nbguard restore` loads this state)")
                raise
            self._said(f"stopped at once; the last snapshot is kept{self._last_text()}")
            raise
        except RestoreError as exc:
            spelling = self.options.spelling
            if spelling.fresh in str(exc):  # already says how to go on
                raise
            # The loops did not reach the snapshot's position: say both ways on, never retrain silently.
            raise RestoreError(f"{exc}. To continue from another snapshot: {spelling.resume_from('ID')} ; to "
                               f"start over: {spelling.fresh}") from None
        except Exception:
            if not isinstance(sys.exc_info()[1], NbguardError):
                self._said(f"the cell stopped with an error; the last snapshot is kept{self._last_text()}. "
                           "Fix the problem and run the cell again to resume from there")
            raise
        finally:
            triggers.stop()
            self.guard.on_retake = None
            self.session.running_cell = None

    def _say_unreachable(self) -> None:
        calls = ", ".join(f"{c}()" for c in self.reach.foreign[:2]) or "this cell"
        refused = "".join(f"; {name}(): {why}" for name, why in list(self.reach.refused.items())[:2])
        self._said(f"no training loop nbguard can reach: {calls} runs its loop in code outside the notebook{refused}. "
                   "Saved: at the end of the cell, on interrupt (at once) and at shutdown; not during the loop. "
                   "To be protected while it trains, write the loop in the notebook (a function defined in an "
                   "earlier cell works), or use the library's own checkpointing")

    def _last_text(self, brief: bool = False) -> str:
        self.guard.flush(10)
        last = self.guard.last_saved or (self.resumed_from if self.resumed_from else None)
        if brief:
            return f"{last.id}{' (' + last.label + ')' if last.label else ''}" if last is not None else "(none)"
        if last is None:
            return " (none was taken yet)"
        return f" ({last.id}{', ' + last.label if last.label else ''}, {ago(last.created)})"

    def _said(self, message: str) -> None:
        print(f"nbguard: {message}", flush=True)

