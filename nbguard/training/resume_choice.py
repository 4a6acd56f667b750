"""Which snapshot a guarded cell continues from, and why: the same code, edited code whose loops
still mean the same, a snapshot named once with ``--resume-from``, or none.

A snapshot's loop positions are pairs (loop number, iterations done), numbered in the order the
cell's loops appear, then those of the notebook's functions it calls. They keep their meaning when
the code is edited without changing how its loops nest: a new bound (``range(5)`` → ``range(8)``),
another learning rate, a print or a line added. ``CodeVersion`` is what every snapshot stores of
that code: a fingerprint of what the cell and each function it reaches do, and a digest of exactly
how their loops nest (``loop_structure``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..engine.catalog import Catalog
from ..engine.snapshot import Snapshot
from ..errors import SnapshotError, UsageError
from ..format.manifest import SnapshotInfo
from ..humanize import ago, clock
from .spelling import MAGIC, Spelling


@dataclass(frozen=True)
class CodeVersion:
    """The code of a guarded run as each snapshot records it: the cell's fingerprint and loop
    structure, and for each of the notebook's (or script's) functions it reaches, by qualified name,
    the same two (a function without loops has structure "")."""

    fingerprint: str
    structure: str
    functions: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The entries stored in a snapshot's ``extra``."""
        return {"fingerprint": self.fingerprint, "structure": self.structure,
                "functions": {name: list(pair) for name, pair in self.functions.items()}}

    def edited_since(self, extra: Mapping[str, Any], cell: str = "the cell") -> list[str]:
        """What differs from the code that took a snapshot (``extra``): ``cell`` and the functions,
        as 'train()'. A function is compared where both know it: a snapshot taken before functions
        were recorded, or a function only one side reaches, says nothing about it."""
        edited = [cell] if extra.get("fingerprint") != self.fingerprint else []
        return edited + [f"{name}()" for name in self._differing(extra, 0)]

    def renested_since(self, extra: Mapping[str, Any], cell: str = "the cell") -> list[str]:
        """Which of the code's loops nest differently from the snapshot's (``edited_since``'s terms)."""
        renested = [cell] if extra.get("structure") != self.structure else []
        return renested + [f"{name}()" for name in self._differing(extra, 1)]

    def _differing(self, extra: Mapping[str, Any], part: int) -> list[str]:
        saved = extra.get("functions")
        if not isinstance(saved, Mapping):
            return []
        return [name for name, pair in self.functions.items()
                if isinstance(saved.get(name), list) and len(saved[name]) == 2 and saved[name][part] != pair[part]]


def _joined(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


@dataclass
class ResumeChoice:
    """The snapshot to continue from (None: start at the top), what to tell the user, and the
    snapshot a ``--resume-from`` started this lineage at (recorded with every later save)."""

    snapshot: Snapshot | None = None
    notes: list[str] = field(default_factory=list)
    edited: list[str] = field(default_factory=list)  # the code that differs from the snapshot's ('train()')
    origin: str | None = None
    continues_finished: bool = False  # an edited cell goes on from a finished run's last loop

    @property
    def changed(self) -> bool:
        """Whether the code differs from the one that took the snapshot."""
        return bool(self.edited)


def choose(catalog: Catalog, run: str, *, code: CodeVersion, fresh: bool = False, resume_from: str | None = None,
           start_point: str | None = None, spelling: Spelling = MAGIC) -> ResumeChoice:
    """Decide where a guarded cell continues. Raises ``UsageError`` when the newest snapshot was
    taken by a version of the cell, or of a function it calls, whose loops nest differently, or
    when a finished run's code was edited and where its loops ended is not known (never retrains
    silently, never restores stale results silently). The advice in notes and errors names the
    options as ``spelling`` writes them."""
    if fresh:
        return ResumeChoice()
    if start_point:  # restored by hand (panel, %nbguard restore): continue from exactly that one
        snapshot = catalog.get(start_point, run)
        return ResumeChoice(snapshot, edited=code.edited_since(extra_of(snapshot), spelling.cell))
    if resume_from:
        return _resume_from(catalog, run, resume_from, code, spelling)
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
    edited = code.edited_since(extra, spelling.cell)
    if not edited:
        return choice
    renested = code.renested_since(extra, spelling.cell)
    if renested:
        raise UsageError(f"snapshot {describe(snapshot)} was taken by an earlier version of {_joined(renested)} whose "
                         "loops nest differently, so its position cannot be mapped onto the code now. To continue "
                         f"from it anyway: {spelling.resume_from(snapshot.id)} ; to start over: {spelling.fresh}")
    if extra.get("completed") and not extra.get("final_loops"):
        raise UsageError(f"this run finished (snapshot {describe(snapshot)}) with an earlier version of "
                         f"{_joined(edited)}, and where its loops ended is not known. To train the edited code from "
                         f"the start: {spelling.fresh} ; to take that final state as it is: "
                         f"{spelling.resume_from(snapshot.id)}")
    choice.edited = edited
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


def _resume_from(catalog: Catalog, run: str, ref: str, code: CodeVersion, spelling: Spelling) -> ResumeChoice:
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
        return ResumeChoice(newest, [*skipped, note], edited=code.edited_since(extra_of(newest), spelling.cell),
                            origin=origin)
    target = catalog.get(ref)
    return ResumeChoice(target, edited=code.edited_since(extra_of(target), spelling.cell), origin=target.id)


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
