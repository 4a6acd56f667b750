"""Does a snapshot fit the live objects? Checked from the manifest alone (tensors are
``Placeholder``s here, no bytes read), and each stored tensor paired with the live tensor it fills."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CorruptSnapshotError, RestoreError
from .capture import kind_of, type_name


class Placeholder:
    """A stored tensor not read yet: what a tree decodes to before its bytes are read, so every
    name, shape and dtype can be checked first. (``.numpy()`` stands in for ``$ndarray`` values.)"""

    __slots__ = ("key", "dtype", "shape", "stride", "byte_offset", "storage")

    def __init__(self, key: str, spec: dict[str, Any], dtype: torch.dtype):
        self.key = key
        self.dtype = dtype
        self.shape = torch.Size(spec["shape"])
        self.stride = tuple(spec["stride"])
        self.byte_offset = spec["byte_offset"]
        self.storage = spec["storage"]

    def numpy(self) -> Placeholder:
        return self

    def dim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def is_contiguous(self) -> bool:
        expected, stride = 1, []
        for d in reversed(self.shape):
            stride.append(expected)
            expected *= d
        return all(d == 1 or s == e for d, s, e in zip(self.shape, self.stride, reversed(stride), strict=True))



@dataclass
class Item:
    """One object (or value) to restore, and how its stored tensors meet live ones."""

    name: str
    kind: str  # "value", "generator" or "stateful"
    live: Any
    tree: Any
    pairs: dict[str, torch.Tensor] = field(default_factory=dict)  # tensor key -> the live tensor it fills
    in_place: set[str] = field(default_factory=set)  # keys whose bytes may land in the live tensor itself



def check_fits(item: Item, saved_type: str, state: Any) -> None:
    name, live = item.name, item.live
    if item.kind == "generator":
        if not isinstance(live, torch.Generator):
            raise RestoreError(f"{name} is a {describe(live)} in your session but a torch.Generator in the snapshot")
        if not isinstance(state.get("state") if isinstance(state, dict) else None, Placeholder):
            raise CorruptSnapshotError(f"the saved state of {name} is not a generator state")
        return
    if kind_of(live) != "stateful":
        raise RestoreError(f"{name} in your session is a {describe(live)} without load_state_dict(); "
                           f"the snapshot holds a {saved_type.rsplit('.', 1)[-1]}")
    if isinstance(live, torch.nn.Module):
        _check_module(item, state)
    elif isinstance(live, torch.optim.Optimizer):
        _check_optimizer(item, state, saved_type)
    elif type_name(live) != saved_type and type(live).__name__ != saved_type.rsplit(".", 1)[-1]:
        raise RestoreError(f"{name} is a {describe(live)} in your session but a {saved_type.rsplit('.', 1)[-1]} in the "
                           "snapshot: create the same kind of object, then restore")


def describe(live: Any) -> str:
    return type(live).__name__


def _dtype_refusal(what: str, saved: torch.dtype, live: torch.dtype, where: str) -> RestoreError:
    return RestoreError(f"{what} is {saved} in the snapshot but {live} in {where}; nbguard does not convert values "
                        f"silently: make it {saved} first (e.g. model.to({saved})), or load the values yourself with "
                        "snapshot.state_dict(name) and load_state_dict, which converts")


def _check_module(item: Item, state: Any) -> None:
    name, module = item.name, item.live
    if not isinstance(state, dict):
        raise CorruptSnapshotError(f"the saved state of {name} is not a state_dict")
    live = module.state_dict()
    missing = [k for k in live if k not in state]
    unexpected = [k for k in state if k not in live]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing in the snapshot: {', '.join(map(str, missing[:5]))}")
        if unexpected:
            detail.append(f"not in your model: {', '.join(map(str, unexpected[:5]))}")
        raise RestoreError(f"{name} does not match the snapshot ({'; '.join(detail)}): build the model the same "
                           "way as when the snapshot was taken")
    # bytes may land in a tensor state_dict() hands out only if it is the module's own memory
    own = {} if _custom_loading(module) else {
        (t.data_ptr(), t.dtype, t.shape): t for t in (*module.parameters(), *module.buffers()) if t is not None}
    for key, tensor in live.items():
        saved = state[key]
        if not isinstance(tensor, torch.Tensor):
            continue
        if not isinstance(saved, Placeholder):
            raise CorruptSnapshotError(f"the saved {name}.{key} is not a tensor")
        if tensor.shape != saved.shape:
            raise RestoreError(f"{name}.{key} has shape {list(saved.shape)} in the snapshot but {list(tensor.shape)} in "
                               "your model: build the model with the same sizes as when the snapshot was taken")
        if tensor.dtype != saved.dtype:
            raise _dtype_refusal(f"{name}.{key}", saved.dtype, tensor.dtype, "your model")
        item.pairs[saved.key] = tensor
        if (tensor.data_ptr(), tensor.dtype, tensor.shape) in own:
            item.in_place.add(saved.key)


def _custom_loading(module: torch.nn.Module) -> bool:
    """Whether saving or loading runs code of the model's own (hooks, an overridden ``state_dict``
    or ``_load_from_state_dict`` outside torch), which may hand out copies or read the incoming
    values: then values are copied in by ``load_state_dict``, as torch does."""
    for sub in module.modules():
        if sub._load_state_dict_pre_hooks or sub._load_state_dict_post_hooks or sub._state_dict_hooks \
                or getattr(sub, "_state_dict_pre_hooks", None):
            return True
        for method in ("_load_from_state_dict", "state_dict", "_save_to_state_dict", "load_state_dict"):
            code = getattr(type(sub), method)
            if code is not getattr(torch.nn.Module, method) and not code.__module__.startswith("torch."):
                return True
    return False


def _check_optimizer(item: Item, state: Any, saved_type: str) -> None:
    name, optimizer = item.name, item.live
    if type_name(optimizer) != saved_type:
        raise RestoreError(f"{name} is a {describe(optimizer)} in your session but a {saved_type.rsplit('.', 1)[-1]} in "
                           "the snapshot: create the same optimizer, then restore")
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list):
        raise CorruptSnapshotError(f"the saved state of {name} has no param_groups")
    live_sizes = [len(g["params"]) for g in optimizer.param_groups]
    saved_sizes = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else -1
                   for g in groups]
    if live_sizes != saved_sizes:
        raise RestoreError(f"{name} has parameter groups of sizes {live_sizes} in your session but {saved_sizes} in the "
                           "snapshot: create it over the same model parameters")
    saved_state = state.get("state")
    if not isinstance(saved_state, dict):
        raise CorruptSnapshotError(f"the saved state of {name} has no per-parameter state")
    live_params = dict(zip([i for g in groups for i in g["params"]],
                           [p for g in optimizer.param_groups for p in g["params"]], strict=True))
    for pid, entry in saved_state.items():
        param = live_params.get(pid) if isinstance(pid, int) else None
        if param is None or not isinstance(entry, dict):
            raise CorruptSnapshotError(f"the saved state of {name} refers to an unknown parameter {pid!r}")
        current = optimizer.state.get(param, {})  # the optimizer's own tensors, whatever state_dict() hands out
        for key, value in entry.items():
            if not isinstance(value, Placeholder):
                continue
            if value.dim() > 0 and value.shape != param.shape:
                raise RestoreError(f"{name}: the saved {key} of parameter {pid} has shape {list(value.shape)} but the "
                                   f"parameter has {list(param.shape)}: create it over the same model parameters")
            target = current.get(key)
            expected = target.dtype if isinstance(target, torch.Tensor) else \
                param.dtype if key != "step" and param.is_floating_point() and value.dim() > 0 else None
            if expected is not None and value.dtype != expected:
                raise _dtype_refusal(f"{name}: the saved {key} of parameter {pid}", value.dtype, expected,
                                     "your session")
            if isinstance(target, torch.Tensor) and target.shape == value.shape:
                item.pairs[value.key] = target
                # load_state_dict keeps such a tensor as it is (no cast, no copy): it may be filled in place
                if key != "step" and target.dtype == param.dtype and target.device == param.device:
                    item.in_place.add(value.key)
