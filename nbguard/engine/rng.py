"""The global random number generators: Python's, NumPy's, torch's CPU and every CUDA device."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

STREAMS = ("python", "numpy", "torch", "cuda")


def capture() -> dict[str, Any]:
    """The state of every global RNG. CUDA is read only if it is already initialised."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def check(state: Any) -> None:
    from ..errors import CorruptSnapshotError

    try:
        if not isinstance(state, dict):
            raise TypeError("not a mapping")
        if "python" in state:
            version, internal, gauss = state["python"]
            random.Random().setstate((version, tuple(internal), gauss))
        if "numpy" in state:
            np.random.RandomState().set_state(tuple(state["numpy"]))
        if "torch" in state:
            torch.Generator().set_state(state["torch"].to("cpu", torch.uint8).contiguous())
        for s in state.get("cuda") or ():
            if not isinstance(s, torch.Tensor):
                raise TypeError("cuda state is not a tensor")
    except (TypeError, ValueError, RuntimeError, AttributeError, OverflowError) as exc:
        raise CorruptSnapshotError(f"the snapshot's random generator states are damaged: {exc}") from exc


def restore(state: dict[str, Any]) -> list[str]:
    """Set every RNG found in ``state``; returns the names of the streams restored."""
    restored = []
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        restored.append("python")
    if "numpy" in state:
        np.random.set_state(tuple(state["numpy"]))
        restored.append("numpy")
    if "torch" in state:
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8).contiguous())
        restored.append("torch")
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        devices = min(len(cuda), torch.cuda.device_count())
        for index in range(devices):
            torch.cuda.set_rng_state(cuda[index].to("cpu", torch.uint8).contiguous(), index)
        restored.append(f"cuda ({devices} device{'s' if devices != 1 else ''})")
    return restored

