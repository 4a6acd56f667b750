"""A guarded cell run: find the state, resume where the run stopped, save at safe points.

``CheckpointedCell`` is what ``%%checkpointed`` calls, and it needs no IPython: it takes the
cell's source, the namespace it runs in, and the options. The loops of the cell are rewritten
(``loops``) so that a timer, an interrupt or a shutdown request only sets a flag and the save
happens at the end of the current iteration.
"""

from __future__ import annotations

import ast
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import numpy as np
import torch

from . import rng
from .discover import Discovery, discover, why_not_plain
from .errors import NbguardError, SnapshotError
from .frame_state import FrameNamespace, capture_locals
from .humanize import ago, clock
from .loops import LoopPosition, LoopRuntime, ResumePlan, instrument_cell
from .loops.reach import reach
from .manifest import SnapshotInfo
from .session import CellOptions, Session
from .snapshot import Snapshot

RESULT_NAME = "__nbguard_result__"  # where a guarded function call (nbguard.checkpointed) leaves its result
RESULT_KEY = "nbguard.result"  # ... and the name a plain result is saved under (never a notebook variable)
STEP_NAMES = {"step", "steps", "global_step", "iteration", "it", "itr", "iter_num"}
DOUBLE_INTERRUPT_SECONDS = 3.0


class StopAfterSave(KeyboardInterrupt):
    """Raised at the safe point after an interrupt's snapshot was taken."""


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
        self.reach = reach(self.cell.tree, namespace, first_id=len(self.cell.loops),
                           entries=[entry] if entry is not None else [])
        self.local_skip = frozenset().union(*(f.targets for f in self.reach.functions))
        self.guard = session.guard(options, run)
        self.location = session.store_location(options)
        self.labels = _loop_labels(source, self.cell.loops)
        self.loop_targets = _loop_targets(source)
        self.discovery: Discovery | None = None
        self.runtime: LoopRuntime | None = None
        self.saves = 0
        self.resumed_from: SnapshotInfo | None = None
        self._stop_requested = 0.0
        self._shutdown = False
        self._timer_pending = False
        self._said_captured = False
        self._done = threading.Event()
        self.finished = False
        self.result: Any = None  # what a guarded function returned (nbguard.checkpointed)
        self._generator_cache: dict[str, torch.Generator] | None = None

    # -- state -------------------------------------------------------------------------------
    def _discover(self) -> Discovery:
        self.discovery = discover(self.source, self.namespace, include=self.options.state,
                                  exclude=self.options.exclude)
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
        self.guard._say_once(key, message)

    # -- saving --------------------------------------------------------------------------------
    def save(self, positions: list[LoopPosition] | None, *, completed: bool = False, tags: tuple[str, ...] = (),
             note: str | None = None, wait: bool = False, frames: list | None = None):
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
            label = self.labels.get(p.loop_id) or {0: "epoch", 1: "batch"}.get(index, f"loop{index + 1}")
            position[label if label not in position else f"{label}{index + 1}"] = p.completed
        if completed:
            position["completed"] = True
        if completed and RESULT_NAME in self.namespace:
            state, result = self._with_result(state)
        else:
            result = None
        extra = {"fingerprint": self.cell.fingerprint, "loops": loops, "completed": completed, "result": result,
                 # other names of saved objects ('model' for 'model_ft'): a re-run may know only those yet
                 "aliases": dict(self.discovery.aliases) if self.discovery is not None else {}}
        at_epoch_end = positions is None or len(positions) <= 1
        handle = self.guard.save(state, metrics=self.metrics(state, with_best=at_epoch_end), position=position, note=note,
                                 tags=tags, extra=extra, wait=wait)
        self.saves += 1
        return handle

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

    def _on_safe_point(self, point) -> None:
        reasons = set(point.reasons)
        interrupted = "interrupt" in reasons or "shutdown" in reasons
        if reasons <= {"timer", "retake"} and self.guard.busy:
            self._timer_pending = True  # coalesce: the timer thread asks again once the writer is free
            return
        tags = ("interrupted",) if interrupted else ()
        handle = self.save(point.positions, tags=tags, wait=interrupted, frames=point.frames)
        if "shutdown" in reasons:
            self._shutdown_after_save(handle)
        if "interrupt" in reasons:
            label = self.guard.last_saved.label if self.guard.last_saved else ""
            print(f"nbguard: interrupted — saved a snapshot{f' at {label}' if label else ''}. "
                  "Run the cell again to continue from there.", flush=True)
            raise StopAfterSave()

    def _shutdown_after_save(self, handle) -> None:
        self.guard.flush(30)
        self.report("saved a snapshot before shutting down (SIGTERM); run it again to resume from there")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    def save_if_changed(self, reason: str = "manual") -> bool:
        """A final snapshot when the guarded objects changed since the last one (used at shutdown)."""
        if self.guard.last_saved is None or not self.guard.changed_since_last(self.state()):
            return False
        self.save(None, completed=self.finished, tags=(reason,), wait=True)
        return True

    def _generators(self) -> dict[str, torch.Generator]:
        # Looked up once per cell run, when the first loop starts (loaders exist by then).
        if self._generator_cache is None:
            objects = self._discover().objects
            self._generator_cache = {n: g for n, g in objects.items() if isinstance(g, torch.Generator)}
        return self._generator_cache

    def _capture_birth(self) -> dict[str, Any]:
        """The RNG states a loop's iterable may draw from as it is created (a shuffling sampler)."""
        return {"rng": rng.capture(), "generators": {n: g.get_state() for n, g in self._generators().items()}}

    def _apply_birth(self, birth: Any) -> None:
        if not birth:
            return
        rng.restore(birth["rng"])
        generators = self._generators()
        for name, state in birth["generators"].items():
            if name in generators:
                generators[name].set_state(state)

    # -- resume --------------------------------------------------------------------------------
    def _find_resume(self) -> tuple[Snapshot | None, list[str]]:
        catalog = self.guard.catalog
        options = self.options
        if options.fresh:
            return None, []
        start_point = self.session.start_points.pop((self.location, self.run_name), None)
        ref = options.resume_from or start_point
        if ref:
            return catalog.get(ref, None if options.resume_from else self.run_name), []
        try:
            snapshot, skipped = catalog.latest_good(self.run_name)
        except SnapshotError:
            return None, [f"{path}: {problem}" for path, problem in catalog.problems.items()]
        extra = _extra(snapshot)
        if extra.get("fingerprint") != self.cell.fingerprint:
            when = f"{ago(snapshot.info.created)} ({clock(snapshot.info.created)})"
            label = f", {snapshot.info.label}" if snapshot.info.label else ""
            self.report(f"snapshot {snapshot.id} ({when}{label}) was taken by an earlier version of this cell, so it "
                        f"is not applied. To continue from it anyway: %%checkpointed --resume-from {snapshot.id} ; "
                        "to start over and stop seeing this: --fresh")
            return None, skipped
        return snapshot, skipped

    def _plan(self, snapshot: Snapshot) -> ResumePlan:
        extra = _extra(snapshot)
        if extra.get("completed"):
            return ResumePlan(completed=True)
        positions = [LoopPosition(int(loop[0]), int(loop[1]), loop[2], tuple(loop[3]) if loop[3] is not None else None)
                     for loop in extra.get("loops", [])]
        return ResumePlan(positions=positions)

    def _restore(self, snapshot: Snapshot) -> None:
        frames = self.runtime.frames if self.runtime is not None else []
        namespace = FrameNamespace(self.namespace, frames)
        objects = dict(self._discover().objects)
        for alias, target in _extra(snapshot).get("aliases", {}).items():
            if target not in objects and alias in objects:
                objects[target] = objects[alias]
            elif target not in objects and alias in self.namespace:
                objects[target] = self.namespace[alias]
        report = snapshot.restore(objects, namespace=namespace)
        namespace.apply()
        self.resumed_from = snapshot.info
        # The restored snapshot is the base of the next one: unchanged tensors are not written again.
        info = snapshot.info
        when = f"saved {ago(info.created)} at {clock(info.created)}"
        where = f", {info.label}" if info.label else ""
        what = ", ".join(name for name, _ in report.restored)
        finished = _extra(snapshot).get("completed")
        if finished:
            print(f"nbguard: this run already finished (snapshot {info.id}, {when}); restored its final state "
                  f"({what}) and skipped the loops. To train again from scratch: %%checkpointed --fresh", flush=True)
        else:
            print(f"nbguard: resumed from snapshot {info.id} ({when}{where}); restored {what} and the random "
                  f"number generators ({', '.join(report.rng)})", flush=True)
        if report.missing:
            print(f"nbguard: not found in the notebook, so not restored: {', '.join(report.missing)} "
                  "(run the cell that creates them first)", flush=True)
        for note in report.notes:
            print(f"nbguard: {note}", flush=True)
        if self.runtime is not None and getattr(self.runtime, "resumed_with_workers", False):
            print("nbguard: note — a DataLoader with worker processes was resumed mid-epoch; if its dataset draws "
                  "random numbers (augmentation), the rest of this epoch can differ slightly from an "
                  "uninterrupted run", flush=True)

    # -- running -------------------------------------------------------------------------------
    def request_shutdown(self) -> None:
        self._shutdown = True
        if self.runtime is not None:
            self.runtime.request_safe_point("shutdown")

    def _on_sigint(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self._stop_requested and now - self._stop_requested < DOUBLE_INTERRUPT_SECONDS:
            raise KeyboardInterrupt  # second interrupt: stop at once
        self._stop_requested = now
        print("nbguard: interrupt received — saving at the end of this iteration (interrupt again to stop now)",
              flush=True)
        if self.runtime is not None:
            self.runtime.request_safe_point("interrupt")

    def _timer(self) -> None:
        interval = self.options.every
        next_at = time.monotonic() + interval
        while not self._done.wait(min(0.5, max(0.0, next_at - time.monotonic()))):
            if self._timer_pending and not self.guard.busy:
                self._timer_pending = False
                self.runtime.request_safe_point("timer")
            if time.monotonic() >= next_at:
                next_at = time.monotonic() + interval
                self.runtime.request_safe_point("timer")

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
            if snapshot is not None and not _extra(snapshot).get("completed"):
                self._said(f"snapshot {snapshot.info.id} was taken while this cell ran; nbguard cannot resume inside "
                           f"a loop it cannot reach, so the cell runs from the start (`%nbguard restore "
                           f"{snapshot.info.id}` loads that state instead)")
                snapshot = None
        plan = self._plan(snapshot) if snapshot is not None else None
        if plan is not None and plan.completed and not self.cell.loops:
            # The loops live in functions: running the cell again would run the code after their loops
            # with fresh local variables (best weights loaded from the start). The final state is all.
            self.session.last_cell = self
            self._restore(snapshot)
            self.finished = True
            result = _extra(snapshot).get("result")
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
            capture_birth=self._capture_birth,
            apply_birth=self._apply_birth,
            resume=plan,
            on_resume=(lambda: self._restore(snapshot)) if snapshot is not None else None,
            every_iter=self.options.every_iter,
        )
        self.session.running_cell = self
        self.session.last_cell = self
        # Without a safe point an interrupt stops the cell at once (KeyboardInterrupt), saved below.
        previous_sigint = _install(signal.SIGINT, self._on_sigint) if reachable else None
        runtime = self.runtime
        self.guard.on_retake = lambda: runtime.request_safe_point("retake")  # a save found stale bytes
        timer = threading.Thread(target=self._timer, name="nbguard-timer", daemon=True)
        timer.start()
        try:
            with self.runtime.active():
                self.runtime.execute(self.namespace)
            self.save(None, completed=True, tags=("final",), wait=True)
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
        except Exception:
            if not isinstance(sys.exc_info()[1], NbguardError):
                self._said(f"the cell stopped with an error; the last snapshot is kept{self._last_text()}. "
                           "Fix the problem and run the cell again to resume from there")
            raise
        finally:
            self._done.set()
            self.guard.on_retake = None
            _restore_handler(signal.SIGINT, previous_sigint)
            self.session.running_cell = None

    def _say_unreachable(self) -> None:
        calls = ", ".join(f"{c}()" for c in self.reach.foreign[:2]) or "this cell"
        refused = "".join(f"; {name}(): {why}" for name, why in list(self.reach.refused.items())[:2])
        self._said(f"no training loop nbguard can reach: {calls} runs its loop in code outside the notebook{refused}. "
                   "Saved: at the end of the cell, on interrupt (at once) and at shutdown; not during the loop. "
                   "To be protected while it trains, write the loop in the notebook (a function defined in an "
                   "earlier cell works), or use the library's own checkpointing")

    def _last_text(self) -> str:
        self.guard.flush(10)
        last = self.guard.last_saved or (self.resumed_from if self.resumed_from else None)
        if last is None:
            return " (none was taken yet)"
        return f" ({last.id}{', ' + last.label if last.label else ''}, {ago(last.created)})"

    def _said(self, message: str) -> None:
        print(f"nbguard: {message}", flush=True)


def _extra(snapshot: Snapshot) -> dict[str, Any]:
    from .codec import decode

    value = decode(snapshot.manifest["extra"], snapshot.tensor)
    return value if isinstance(value, dict) else {}


def _install(signum: int, handler: Callable) -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signum)
    signal.signal(signum, handler)
    return previous


def _restore_handler(signum: int, previous: Any) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signum, previous)


def _loop_targets(source: str) -> set[str]:
    """Names bound by the cell's for-loops (epoch counters and batches are not metrics)."""
    return {n.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.For)
            for n in ast.walk(node.target) if isinstance(n, ast.Name)}


def _loop_labels(source: str, loops: list) -> dict[int, str]:
    """Readable names for loop positions: 'epoch' for the outermost, 'batch' inside it, 'step' for
    loops whose variable is a step counter or for while loops."""
    targets: dict[int, str | None] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.For):
            target = node.target
            if isinstance(target, ast.Tuple) and target.elts:
                target = target.elts[0]
            targets[node.lineno] = target.id if isinstance(target, ast.Name) else None
    labels: dict[int, str] = {}
    for loop in loops:
        name = targets.get(loop.lineno)
        if loop.kind == "while" or (name and name.lower() in STEP_NAMES):
            label = "step"
        else:
            label = {0: "epoch", 1: "batch"}.get(loop.depth, f"loop{loop.depth + 1}")
        if label in labels.values():
            label = f"{label}{loop.depth + 1}"
        labels[loop.id] = label
    return labels
