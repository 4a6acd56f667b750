"""Loop positions as people count them: "in epoch 3, after batch 27 of 48", "finished 5 of 5 epochs".

A stored position counts iterations *done* (where to continue): after 2 full epochs and 27 batches
of the third it holds ``epoch 2, batch 27``. The printed "epoch 3" of the user's own loop is the
one in progress, so the text names that one.
"""

from __future__ import annotations

from collections.abc import Sequence

PLURALS = {"batch": "batches"}


def plural(label: str) -> str:
    """'epoch' → 'epochs', 'batch' → 'batches', 'loop3' → 'loop3 iterations'."""
    base = label.rstrip("0123456789")
    if base != label or base.startswith("loop"):
        return f"{label} iterations"
    return PLURALS.get(base, base + "s")


def describe(done: Sequence[tuple[str, int, int | None]], *, finished: bool = False) -> str:
    """``done``: (label, iterations done, total or None) of the active loops, outermost first; the
    last one has just completed an iteration, the others are in the middle of one."""
    if not done:
        return "finished" if finished else ""
    if finished:
        label, count, total = done[0]
        of = f" of {total}" if total is not None and total >= count else ""
        return f"finished {count}{of} {plural(label) if (total or count) != 1 else label}"
    parts = [f"in {label} {count + 1}" for label, count, _ in done[:-1]]
    label, count, total = done[-1]
    of = f" of {total}" if total is not None and total >= count else ""
    parts.append(f"after {label} {count}{of}")
    return ", ".join(parts)


def total_of(iterator: object, consumed: int) -> int | None:
    """The number of items ``iterator`` yields in all, given that it has yielded ``consumed``:
    its length (a DataLoader's iterator), or ``consumed`` plus what it says is left (a range, a
    list); looks through ``enumerate``. None when it cannot tell (generators, wrappers)."""
    try:
        if type(iterator) is enumerate:
            iterator = iterator.__reduce__()[1][0]  # type: ignore[attr-defined]
        if hasattr(type(iterator), "__len__"):
            return len(iterator)  # type: ignore[arg-type]
        hint = getattr(type(iterator), "__length_hint__", None)
        if hint is not None:
            left = hint(iterator)
            return consumed + left if 0 <= left < 2**62 else None
    except Exception:
        return None
    return None
