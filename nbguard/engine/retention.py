"""Which snapshots to keep: the last N, the best K by a metric, and every pinned one."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UsageError
from ..format.manifest import SnapshotInfo


@dataclass(frozen=True)
class Policy:
    """Keep the ``keep`` newest, the ``best_k`` best by ``best_metric`` (``best_mode`` 'min' or
    'max'), and every pinned snapshot."""

    keep: int = 3
    best_metric: str | None = None
    best_mode: str = "min"
    best_k: int = 1

    def __post_init__(self) -> None:
        if type(self.keep) is not int or self.keep < 1:
            raise UsageError(f"keep must be a whole number of at least 1, not {self.keep!r}")
        if self.best_mode not in ("min", "max"):
            raise UsageError(f"the best mode must be 'min' or 'max', not {self.best_mode!r}")
        if type(self.best_k) is not int or self.best_k < 0:
            raise UsageError(f"best_k must be a whole number, not {self.best_k!r}")

    @classmethod
    def parse_best(cls, text: str) -> tuple[str, str]:
        """'val_loss:min' → ('val_loss', 'min'); a bare name means 'min' for loss-like names, else 'max'."""
        name, _, mode = text.partition(":")
        name = name.strip()
        if not name.isidentifier():
            raise UsageError(f"--best needs a variable name, optionally with :min or :max (e.g. val_loss:min), not {text!r}")
        if not mode:
            mode = "min" if any(w in name.lower() for w in ("loss", "err", "perplexity", "mse", "mae")) else "max"
        if mode not in ("min", "max"):
            raise UsageError(f"--best {text}: the mode after ':' must be min or max")
        return name, mode


def best_of(snapshots: Sequence[SnapshotInfo], metric: str, mode: str, k: int = 1) -> list[SnapshotInfo]:
    """The ``k`` best snapshots by ``metric`` (ties: the newer one wins)."""
    scored = [s for s in snapshots if isinstance(s.metrics.get(metric), (int, float)) and not math.isnan(s.metrics[metric])]
    sign = 1 if mode == "min" else -1
    scored.sort(key=lambda s: (sign * s.metrics[metric], -s.created))
    return scored[:k]


def to_delete(snapshots: Sequence[SnapshotInfo], policy: Policy, *, protect: Sequence[str] = ()) -> list[SnapshotInfo]:
    """Snapshots of one run that the policy lets go (``protect``: ids never deleted)."""
    newest_first = sorted(snapshots, key=lambda s: (s.created, s.id), reverse=True)
    kept = {s.id for s in newest_first[: policy.keep]}
    kept |= {s.id for s in newest_first if s.pinned}
    if policy.best_metric:
        kept |= {s.id for s in best_of(newest_first, policy.best_metric, policy.best_mode, policy.best_k)}
    kept |= set(protect)
    return [s for s in newest_first if s.id not in kept]
