"""Looking inside snapshots: two side by side (metrics, which tensors changed and by how much), and
one module's weights exported as a standalone ``.safetensors`` file."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from ..errors import UsageError
from ..format.manifest import SnapshotInfo
from .snapshot import Snapshot
from .weights import write_safetensors


@dataclass
class Comparison:
    """Two snapshots side by side."""

    a: SnapshotInfo
    b: SnapshotInfo
    metrics: list[tuple[str, float | None, float | None]]
    changed: list[tuple[str, float, float]]  # (tensor, max |a-b|, relative change ||a-b|| / ||a||)
    unchanged: list[str]
    only_in_a: list[str]
    only_in_b: list[str]
    scalars: set[str] = field(default_factory=set)

    def describe(self) -> str:
        lines = [f"{self.a.id}  vs  {self.b.id}"]
        for name, x, y in self.metrics:
            lines.append(f"  {name}: {_num(x)} → {_num(y)}")
        lines.append(f"  tensors changed: {len(self.changed)}, unchanged: {len(self.unchanged)}")
        # Ranked by relative change, single numbers (step counters) left out of the top ten.
        ranked = [r for r in self.changed if r[0] not in self.scalars]
        for name, max_abs, rel in sorted(ranked, key=lambda r: -r[2])[:10]:
            lines.append(f"    {name}: max |Δ| {max_abs:.3g}, relative {rel:.3g}")
        return "\n".join(lines)


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.6g}"


def compare_snapshots(first: Snapshot, second: Snapshot) -> Comparison:
    """Metrics side by side, and which tensors changed and by how much (RNG states left out)."""
    names = sorted(set(first.info.metrics) | set(second.info.metrics))
    metrics = [(n, first.info.metrics.get(n), second.info.metrics.get(n)) for n in names]
    keys_a, keys_b = set(first.manifest["tensors"]), set(second.manifest["tensors"])
    changed: list[tuple[str, float, float]] = []
    unchanged: list[str] = []
    scalars: set[str] = set()
    for key in sorted(keys_a & keys_b):
        if key.startswith("rng/"):
            continue
        x, y = first.tensor(key), second.tensor(key)
        if first.manifest["tensors"][key] == second.manifest["tensors"][key] and \
                _content_hash(first, key) == _content_hash(second, key):
            unchanged.append(key)
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            changed.append((key, math.inf, math.inf))
            continue
        if torch.equal(x, y):
            unchanged.append(key)
            continue
        if x.numel() <= 1:
            scalars.add(key)
        diff = x.double() - y.double()
        norm = float(x.double().norm())
        changed.append((key, float(diff.abs().max()), float(diff.norm()) / norm if norm else math.inf))
    return Comparison(first.info, second.info, metrics, changed, unchanged,
                      sorted(k for k in keys_a - keys_b if not k.startswith("rng/")),
                      sorted(k for k in keys_b - keys_a if not k.startswith("rng/")), scalars)


def _content_hash(snapshot: Snapshot, key: str) -> str:
    """The hash of the stored bytes tensor ``key`` lives in."""
    manifest = snapshot.manifest
    hash_: str = manifest["storages"][manifest["tensors"][key]["storage"]]["hash"]
    return hash_


def export_module(snapshot: Snapshot, module: str, out: str | os.PathLike[str]) -> str:
    """Write the weights of one module of ``snapshot`` to a standalone ``.safetensors`` file
    (loadable with ``safetensors.torch.load_file`` or ``nbguard.load_weights``); returns its path."""
    if module not in snapshot.names:
        raise UsageError(f"snapshot {snapshot.id} has no {module!r}; it has: {', '.join(snapshot.names)}")
    state = snapshot.state_dict(module)
    if not isinstance(state, dict):
        raise UsageError(f"{module!r} in snapshot {snapshot.id} is not a module's state_dict")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UsageError(f"{module!r} in snapshot {snapshot.id} holds no tensors to export")
    return write_safetensors(tensors, out, {"nbguard.snapshot": snapshot.id, "nbguard.module": module})
