"""Continuing a run from its snapshot: where the loops pick up, the restore, and what is said.

``resume_plan`` turns a snapshot's stored loop positions into the ``ResumePlan`` the loop runtime
replays; ``restore_snapshot`` puts the snapshot into the cell's objects, the notebook and the local
variables of the functions on the loop path; ``say_restored`` tells the user what was restored.
``LoopBirths`` records, as each loop starts, the random state its iterable may draw from, so that
a resumed loop gets the same shuffled order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import torch

from ..engine import rng
from ..engine.guard import Guard
from ..engine.report import RestoreReport
from ..engine.snapshot import Snapshot
from ..errors import RestoreError
from ..format.manifest import SnapshotInfo
from ..humanize import ago, clock
from .frame_state import FrameNamespace, PathFrame
from .loops import LoopPosition, ResumePlan
from .resume_choice import extra_of
from .spelling import MAGIC, Spelling


def resume_plan(snapshot: Snapshot, *, continues_finished: bool) -> ResumePlan:
    """Where the loops continue: at the snapshot's positions; for a finished run, nowhere (its final
    state is all), unless an edited cell continues it (``continues_finished``): then after the
    iterations its last loop had done."""
    extra = extra_of(snapshot)
    if extra.get("completed") and continues_finished:
        return ResumePlan(positions=[LoopPosition(int(loop[0]), int(loop[1]), loop[2], None)
                                     for loop in extra["final_loops"]])
    if extra.get("completed"):
        return ResumePlan(completed=True)
    positions = [LoopPosition(int(loop[0]), int(loop[1]), loop[2], tuple(loop[3]) if loop[3] is not None else None)
                 for loop in extra.get("loops", [])]
    return ResumePlan(positions=positions)


def restore_snapshot(snapshot: Snapshot, objects: Mapping[str, Any], namespace: MutableMapping[str, Any],
                     frames: list[PathFrame], guard: Guard, spelling: Spelling = MAGIC) -> RestoreReport:
    """Restore ``snapshot`` through the cell's ``guard`` into its training ``objects``, its plain values
    into ``namespace`` and the saved locals into ``frames``. An object saved under a name the cell now
    knows only by another (an alias) is found by that one."""
    into = FrameNamespace(namespace, frames)
    targets = dict(objects)
    for alias, target in extra_of(snapshot).get("aliases", {}).items():
        if target not in targets and alias in targets:
            targets[target] = targets[alias]
        elif target not in targets and alias in namespace:
            targets[target] = namespace[alias]
    try:
        report = guard.restore_from(snapshot, targets, namespace=into)
    except RestoreError as exc:
        raise RestoreError(f"{exc}. Snapshot {snapshot.id} does not fit the objects this notebook built: build "
                           f"the same model (and optimizer) as when it was taken, or start over with "
                           f"{spelling.fresh}") from None
    into.apply()
    return report


def say_restored(info: SnapshotInfo, report: RestoreReport, *, finished: bool, edited: Sequence[str],
                 workers_resumed: bool, spelling: Spelling = MAGIC) -> None:
    """Print what a resume restored: from which snapshot, what, and what it could not."""
    when = f"saved {ago(info.created)} at {clock(info.created)}"
    where = f", {info.label}" if info.label else ""
    what = ", ".join(name for name, _ in report.restored)
    if finished:
        print(f"nbguard: this run already finished (snapshot {info.id}, {when}); restored its final state "
              f"({what}) and skipped the loops. To train again from scratch: {spelling.fresh}", flush=True)
    else:
        their = "its" if len(edited) == 1 else "their"
        changed = f"; {' and '.join(edited)} changed since this snapshot ({their} loops are the same)" if edited else ""
        print(f"nbguard: resumed from snapshot {info.id} ({when}{where}){changed}; restored {what} and the "
              f"random number generators ({', '.join(report.rng)})", flush=True)
    if report.missing:
        print(f"nbguard: not found in the notebook, so not restored: {', '.join(report.missing)} "
              "(run the cell that creates them first)", flush=True)
    for note in report.notes:
        print(f"nbguard: {note}", flush=True)
    if workers_resumed:
        print("nbguard: note — a DataLoader with worker processes was resumed mid-epoch; if its dataset draws "
              "random numbers (augmentation), the rest of this epoch can differ slightly from an "
              "uninterrupted run", flush=True)


class LoopBirths:
    """The RNG states a loop's iterable may draw from as it is created (a shuffling sampler): the
    global generators and the training objects' own (``objects()``: the cell's, by name)."""

    def __init__(self, objects: Callable[[], Mapping[str, object]]):
        self._objects = objects
        self._generators: dict[str, torch.Generator] | None = None

    def generators(self) -> dict[str, torch.Generator]:
        """The named torch generators, looked up once per cell run, when the first loop starts
        (loaders exist by then)."""
        if self._generators is None:
            self._generators = {n: g for n, g in self._objects().items() if isinstance(g, torch.Generator)}
        return self._generators

    def capture(self) -> dict[str, Any]:
        """The states now, stored with the loop's position."""
        return {"rng": rng.capture(), "generators": {n: g.get_state() for n, g in self.generators().items()}}

    def apply(self, birth: Any) -> None:
        """Put back states ``capture`` took (nothing for an empty one)."""
        if not birth:
            return
        rng.restore(birth["rng"])
        generators = self.generators()
        for name, state in birth["generators"].items():
            if name in generators:
                generators[name].set_state(state)
