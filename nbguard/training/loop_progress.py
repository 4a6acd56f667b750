"""What the loop runtime knows about progress, read for the user's benefit: how many iterations a
loop has in all ("after batch 27 of 48"), how far the last top-level loop got ("finished 5 of 5
epochs"), and where a finished run's loop ended (an edited cell with a larger bound continues there).

Best effort: these read the runtime's activation stack and never fail; None or [] when unknown.
Also ``state_mark``, an identity of a state (no copy: one hash pass) to tell "unchanged since restored".
"""

from __future__ import annotations

from typing import Any

import torch

from ..engine.capture import capture
from ..format.blobfile import hash_bytes
from ..stores.directio import byte_view
from . import position_text
from .loops import LoopRuntime


def state_mark(state: dict[str, Any]) -> Any:
    """What identifies a state without copying it: each tensor's layout and the hash of its bytes
    (content, not version counters: native kernels write some tensors without bumping them), and the
    plain values as they would be stored."""
    captured = capture(state, with_rng=False)
    tensors = {key: (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, _content(t))
               for key, t in captured.tensors.items()}
    values = {name: obj["tree"] for name, obj in captured.objects.items() if obj["kind"] == "value"}
    return tensors, values


def _content(tensor: torch.Tensor) -> str | None:
    try:
        flat = tensor.detach().to("cpu").contiguous().view(-1)
        return hash_bytes(byte_view(flat.view(torch.uint8))) if flat.numel() else ""  # not .numpy(): see byte_view
    except (RuntimeError, TypeError, ValueError):  # a layout without plain bytes: never "unchanged"
        return None


def loop_total(runtime: LoopRuntime | None, depth: int, loop_id: int) -> int | None:
    """How many iterations the active loop at ``depth`` has in all, when its iterator can tell
    (a DataLoader, a range, a list, enumerate over one of those); None otherwise. Best effort: it
    reads the runtime's activation stack and never fails."""
    try:
        activation = runtime._stack[depth]  # type: ignore[union-attr]
        if activation.info.id != loop_id or activation.info.kind != "for":
            return None
        return position_text.total_of(activation.src, activation.consumed())
    except Exception:
        return None


def exhausted_top_loop(runtime: LoopRuntime) -> list[list[Any]] | None:
    """The last top-level for loop as a resume position ([[id, iterations, birth]]) when it ran to
    the end of its iterable (not left by a break): an edited cell with a larger bound continues
    there. None when that cannot be known."""
    try:
        activation = runtime._stack[0]
        done = activation.consumed()
        if activation.info.kind != "for" or position_text.total_of(activation.src, done) != done:
            return None
        return [[activation.info.id, done, activation.birth]]
    except Exception:
        return None


def top_progress(runtime: LoopRuntime, labels: dict[int, str]) -> list[tuple[str, int, int | None]]:
    """(label, iterations done, total) of the last top-level loop that ran, for 'finished 5 of 5 epochs'."""
    try:
        activation = runtime._stack[0]
        done = activation.consumed()
        if activation.info.kind == "for":
            total = position_text.total_of(activation.src, done)
        else:
            done, total = done - 1, None  # a while loop counts the test that ended it
        return [(labels.get(activation.info.id, "loop"), done, total)] if done >= 0 else []
    except Exception:
        return []
