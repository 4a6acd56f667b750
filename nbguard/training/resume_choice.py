"""Which snapshot a guarded cell continues from, and why: the same cell, an edited cell whose loops
still mean the same, a snapshot named once with ``--resume-from``, or none.

A snapshot's loop positions are pairs (loop number, iterations done), numbered in the order the
cell's loops appear. They keep their meaning when the cell is edited without changing how its
loops nest: a new bound (``range(5)`` → ``range(8)``), another learning rate, a print or a line
added. ``loop_structure`` is the digest of exactly that nesting, stored with every snapshot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine.catalog import Catalog
from ..engine.snapshot import Snapshot
from ..errors import SnapshotError, UsageError
from ..format.manifest import SnapshotInfo
from ..humanize import ago, clock
from .loops.rewrite import LoopInfo
from .spelling import MAGIC, Spelling


def loop_structure(loops: Sequence[LoopInfo]) -> str:
    """A digest of how the cell's loops nest (kind and parent of each, in order); bounds,
    iterables, bodies and every other line do not count."""
    shape = ";".join(f"{loop.kind}<{'' if loop.parent is None else loop.parent}" for loop in loops)
    return hashlib.sha256(shape.encode()).hexdigest()[:16]


@dataclass
class ResumeChoice:
    """The snapshot to continue from (None: start at the top), what to tell the user, and the
    snapshot a ``--resume-from`` started this lineage at (recorded with every later save)."""

    snapshot: Snapshot | None = None
    notes: list[str] = field(default_factory=list)
    changed: bool = False  # the cell's code differs from the one that took the snapshot
    origin: str | None = None
    continues_finished: bool = False  # an edited cell goes on from a finished run's last loop


def choose(catalog: Catalog, run: str, *, fingerprint: str, structure: str, fresh: bool = False,
           resume_from: str | None = None, start_point: str | None = None,
           spelling: Spelling = MAGIC) -> ResumeChoice:
    """Decide where a guarded cell continues. Raises ``UsageError`` when the newest snapshot was
    taken by a version of the cell whose loops nest differently (never retrains silently). The
    advice in notes and errors names the options as ``spelling`` writes them."""
    if fresh:
        return ResumeChoice()
    if start_point:  # restored by hand (panel, %nbguard restore): continue from exactly that one
        snapshot = catalog.get(start_point, run)
        return ResumeChoice(snapshot, changed=extra_of(snapshot).get("fingerprint") != fingerprint)
    if resume_from:
        return _resume_from(catalog, run, resume_from, fingerprint, spelling)
    try:
        snapshot, skipped = catalog.latest_good(run)
    except SnapshotError:
        return ResumeChoice(notes=[f"{path}: {problem}" for path, problem in catalog.problems.items()])
    extra = extra_of(snapshot)
    choice = ResumeChoice(snapshot, list(skipped), origin=extra.get("origin"))
    other = interleaved_writer(catalog.snapshots(run), snapshot.info)
    if other is not None:
        choice.notes.append(
            f"two writers (two kernels of this notebook?) saved this run at the same time; continuing from the "
            f"newest snapshot, {describe(snapshot)}, written by {snapshot.info.writer or 'an unknown writer'}. "
            f"The other one's newest is {other.id} ({other.writer or 'unknown writer'}): to continue that one, "
            f"{spelling.resume_from(other.id)} ; give each its own run with {spelling.name_option}")
    if extra.get("fingerprint") == fingerprint:
        return choice
    if extra.get("structure") != structure:
        raise UsageError(f"snapshot {describe(snapshot)} was taken by an earlier version of this cell whose loops "
                         "nest differently, so its position cannot be mapped onto this cell. To continue from it "
                         f"anyway: {spelling.resume_from(snapshot.id)} ; to start over: {spelling.fresh}")
    if extra.get("completed") and not extra.get("final_loops"):
        raise UsageError(f"this run finished (snapshot {describe(snapshot)}) with an earlier version of this cell, "
                         "and where its loops ended is not known. To train the edited cell from the start: "
                         f"{spelling.fresh} ; to take that final state as it is: {spelling.resume_from(snapshot.id)}")
    choice.changed = True
    choice.continues_finished = bool(extra.get("completed"))
    return choice


def interleaved_writer(snapshots: list[SnapshotInfo], newest: SnapshotInfo) -> SnapshotInfo | None:
    """The newest snapshot of another writer whose saves interleave with ``newest``'s lineage (each
    snapshot names its parent: the state it descends from), or None. A run continued after a restart
    has a new writer but descends from the old one's snapshot, so it does not count."""
    ancestors, by_id = set(), {s.id: s for s in snapshots}
    current: SnapshotInfo | None = newest
    while current is not None and current.id not in ancestors:
        ancestors.add(current.id)
        current = by_id.get(current.parent) if current.parent else None
    oldest_own = min((by_id[i].created for i in ancestors if i in by_id), default=newest.created)
    for info in snapshots:  # newest first
        if info.id not in ancestors and info.writer != newest.writer and info.created >= oldest_own:
            return info
    return None


def _resume_from(catalog: Catalog, run: str, ref: str, fingerprint: str, spelling: Spelling) -> ResumeChoice:
    """``--resume-from ID`` applies once: once this run has saved after resuming from ID, later
    runs of the cell continue from the run's own newest snapshot."""
    try:
        newest, skipped = catalog.latest_good(run)
    except SnapshotError:
        newest, skipped = None, []
    origin = extra_of(newest).get("origin") if newest is not None else None
    # Compared by id prefix: the snapshot named may have been removed by retention since.
    if newest is not None and isinstance(origin, str) and origin.startswith(ref) and newest.id != origin:
        option = spelling.resume_from_option
        note = (f"{option} {ref} was applied in an earlier run; continuing from this run's newest snapshot "
                f"{describe(newest)} (remove {option} from {spelling.where} to stop seeing this)")
        return ResumeChoice(newest, [*skipped, note], changed=extra_of(newest).get("fingerprint") != fingerprint,
                            origin=origin)
    target = catalog.get(ref)
    return ResumeChoice(target, changed=extra_of(target).get("fingerprint") != fingerprint, origin=target.id)


def describe(snapshot: Snapshot) -> str:
    """'20260102T… (5 min ago, 10:15:03, in epoch 3, after batch 27 of 48)'."""
    info = snapshot.info
    label = f", {info.label}" if info.label else ""
    return f"{info.id} ({ago(info.created)}, {clock(info.created)}{label})"


def extra_of(snapshot: Snapshot) -> dict[str, Any]:
    """What the cell stored beside the state: fingerprint, loop structure, positions, origin."""
    from ..format.codec import decode

    value = decode(snapshot.manifest["extra"], snapshot.tensor)
    return value if isinstance(value, dict) else {}
