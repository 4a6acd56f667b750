"""Time budgets: stop a guarded cell cleanly before the platform ends the session.

Colab ends a runtime after about 12 hours (less on free GPUs), Kaggle a session after 12 hours
(9 for TPUs), without warning. A budget makes the cell save at the last safe point that leaves
time to make the snapshot durable, wait for that, and stop with one line saying how to continue.

``--budget 11h30m`` counts from when the guarded cell starts. Without it, on a platform whose
limit is known, the budget is that limit counted from when the machine (its container) started,
less a safety margin.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import NbguardError, UsageError
from ..humanize import duration

HOUR = 3600.0
# Known session limits and where they are documented in words users recognise.
LIMITS = {"colab": (12 * HOUR, "Colab ends a runtime after at most 12 h"),
          "kaggle": (12 * HOUR, "Kaggle ends a session after 12 h"),
          "kaggle-tpu": (9 * HOUR, "Kaggle ends a TPU session after 9 h")}
SAFETY = 30 * 60.0  # stop this long before a platform's limit: the save must still reach Drive
OFF = ("off", "none", "no", "0")


class TimeBudgetReached(NbguardError):
    """The cell stopped at a safe point because its time budget was nearly used up."""


@dataclass(frozen=True)
class Budget:
    """``seconds`` from ``start`` (a ``time.monotonic()`` reading); ``why`` says where it came from."""

    seconds: float
    start: float
    why: str

    @property
    def deadline(self) -> float:
        return self.start + self.seconds

    def left(self, now: float | None = None) -> float:
        return self.deadline - (time.monotonic() if now is None else now)

    def due(self, save_cost: float, now: float | None = None) -> bool:
        """Whether to save and stop now: what is left no longer covers a save made durable, with
        room to spare (at most a tenth of the budget is kept in reserve)."""
        reserve = min(max(3.0 * save_cost + 5.0, 10.0), self.seconds / 10)
        return self.left(now) <= reserve

    def text(self) -> str:
        return f"{duration(self.seconds)} ({self.why})"


def parse_budget(text: str) -> float | None:
    """'11h30m', '90m', '2h', '45s', '3600' → seconds; 'off' → None (no budget, not even a default)."""
    raw = str(text).strip().lower().replace(" ", "")
    if raw in OFF:
        return None
    units = {"h": HOUR, "m": 60.0, "min": 60.0, "s": 1.0}
    total, number, unit, seen = 0.0, "", "", False
    for char in raw + "\0":
        if char.isdigit() or char == ".":
            if unit:
                total, seen = total + _part(text, number, unit, units), True
                number, unit = "", ""
            number += char
        elif char.isalpha():
            unit += char
        elif char == "\0":
            if number:
                total, seen = total + _part(text, number, unit or "s", units), True
        else:
            raise UsageError(f"--budget {text!r}: use a duration such as 11h30m, 90m or 45s, or 'off'")
    if not seen or total <= 0:
        raise UsageError(f"--budget {text!r}: use a duration such as 11h30m, 90m or 45s, or 'off'")
    return total


def _part(text: str, number: str, unit: str, units: Mapping[str, float]) -> float:
    if unit not in units or not number:
        raise UsageError(f"--budget {text!r}: use a duration such as 11h30m, 90m or 45s, or 'off'")
    try:
        return float(number) * units[unit]
    except ValueError:
        raise UsageError(f"--budget {text!r}: use a duration such as 11h30m, 90m or 45s, or 'off'") from None


def platform_limit(platform: str, environ: Mapping[str, str] = os.environ) -> tuple[float, str] | None:
    """The session limit of ``platform`` in seconds and a sentence naming it; None where unknown."""
    if platform == "kaggle" and (environ.get("TPU_NAME") or environ.get("KAGGLE_TPU")):
        return LIMITS["kaggle-tpu"]
    return LIMITS.get(platform)


def machine_age(proc: str = "/proc") -> float | None:
    """Seconds since this machine (its container's first process) started; None if unknown."""
    try:
        with open(os.path.join(proc, "uptime")) as f:
            uptime = float(f.read().split()[0])
        with open(os.path.join(proc, "1", "stat")) as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks
        return max(0.0, uptime - started / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def default_budget(platform: str, environ: Mapping[str, str] = os.environ, *, age: float | None = None,
                   now: float | None = None) -> Budget | None:
    """The budget a guarded cell gets without ``--budget``: the platform's limit counted from when
    the machine started, less ``SAFETY``; None where no limit is known."""
    limit = platform_limit(platform, environ)
    if limit is None:
        return None
    seconds, why = limit
    age = machine_age() if age is None else age
    now = time.monotonic() if now is None else now
    return Budget(max(60.0, seconds - SAFETY), now - (age or 0.0), f"{why}; this machine started "
                  f"{duration(age or 0.0)} ago")


def describe_default(platform: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """The line ``%load_ext`` prints about the session limit, or None."""
    budget = default_budget(platform, environ)
    if budget is None:
        return None
    return (f"{budget.why}: guarded cells save and stop cleanly {duration(max(0.0, budget.left()))} from now "
            "(change with --budget 11h30m, or --budget off)")
