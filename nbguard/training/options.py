"""The options of a guarded cell: ``CellOptions``, and the checks of the values a user types.

``%%checkpointed --every 10m --keep 5`` and ``%nbguard config every=10m keep=5`` (and
``@nbguard.checkpointed(every="10m")``) all end up here: durations are parsed, counts checked,
unknown settings refused with the list of known ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..engine.retention import Policy
from ..errors import UsageError
from .spelling import MAGIC, Spelling

DURATION_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600}
MIN_EVERY = 0.1  # below this the timer thread would only spin: saves coalesce at the writer anyway


def parse_duration(text: str | float) -> float:
    """'30s', '10m', '1h', '90' (seconds) → seconds."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        raw = str(text).strip().lower()
        number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = raw[len(number):] or "s"
        if unit not in DURATION_UNITS or not number:
            raise UsageError(f"--every {text!r}: use a duration such as 30s, 10m or 1h")
        try:
            value = float(number) * DURATION_UNITS[unit]
        except ValueError:
            raise UsageError(f"--every {text!r}: use a duration such as 30s, 10m or 1h") from None
    if not value >= MIN_EVERY or value == float("inf"):
        raise UsageError(f"--every {text!r}: the interval must be at least {MIN_EVERY:g} s (e.g. 30s, 10m or 1h)")
    return value


def positive_int(name: str, value: Any) -> int:
    """``value`` as a whole number of at least 1; UsageError naming the setting otherwise."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a whole number, not {value!r}") from None
    if number < 1:
        raise UsageError(f"{name} must be at least 1, not {number}")
    return number


@dataclass(frozen=True)
class CellOptions:
    """Options of ``%%checkpointed`` (and defaults set with ``%nbguard config``)."""

    every: float = 300.0
    every_iter: int | None = None
    keep: int = 3
    best: tuple[str, str] | None = None
    name: str | None = None
    dir: str | None = None
    state: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    fresh: bool = False
    resume_from: str | None = None
    budget: float | None = None  # seconds from the cell's start; None: the platform's default; 0: none
    spelling: Spelling = MAGIC  # how advice names these options: the magic's flags or the decorator's

    def policy(self) -> Policy:
        """What the run's snapshots keep: ``keep`` newest, and the best by ``best`` when given."""
        return Policy(keep=self.keep, best_metric=self.best[0] if self.best else None,
                      best_mode=self.best[1] if self.best else "min")


CONFIG_KEYS = {"every", "every_iter", "keep", "best", "dir", "name", "budget"}


def configured(defaults: CellOptions, settings: Mapping[str, Any]) -> CellOptions:
    """``defaults`` changed by ``%nbguard config`` settings (``every='10m'``, ``keep='5'``), each checked."""
    unknown = set(settings) - CONFIG_KEYS
    if unknown:
        raise UsageError(f"unknown setting(s) {', '.join(sorted(unknown))}: use {', '.join(sorted(CONFIG_KEYS))}")
    values = dict(settings)
    if "every" in values:
        values["every"] = parse_duration(values["every"])
    if "keep" in values:
        values["keep"] = positive_int("keep", values["keep"])
    if "every_iter" in values:
        values["every_iter"] = positive_int("every_iter", values["every_iter"])
    if "budget" in values and isinstance(values["budget"], str):
        from .budget import parse_budget

        values["budget"] = parse_budget(values["budget"]) or 0.0
    if "best" in values and isinstance(values["best"], str):
        values["best"] = Policy.parse_best(values["best"])
    return replace(defaults, **values)
