"""What a cell's for-loops are called: labels for positions ('epoch', 'batch', 'step') and the
variables the loops bind (a batch or an epoch counter is neither a metric nor state to save).
"""

from __future__ import annotations

import ast
from collections.abc import Sequence

from .loops import LoopInfo

STEP_NAMES = {"step", "steps", "global_step", "iteration", "it", "itr", "iter_num"}


def loop_targets(source: str) -> set[str]:
    """Names bound by the cell's for-loops (epoch counters and batches are not metrics)."""
    return {n.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.For)
            for n in ast.walk(node.target) if isinstance(n, ast.Name)}


def loop_labels(source: str, loops: Sequence[LoopInfo]) -> dict[int, str]:
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
