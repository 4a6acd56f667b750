"""Capturing: turn live objects into manifest trees plus a set of tensors, changing nothing.

Every RNG is read before any ``state_dict()`` is called and set back afterwards, so a
``state_dict()`` that draws random numbers cannot shift a random stream (torchsnapshot's rule).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..format.codec import Unstorable, encode
from . import rng


def kind_of(obj: Any) -> str:
    """'generator', 'stateful' (has state_dict/load_state_dict) or 'value'."""
    if isinstance(obj, torch.Generator):
        return "generator"
    if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)) \
            and not isinstance(obj, type):
        return "stateful"
    return "value"


def type_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class Capture:
    """Trees for the manifest, and the tensors they refer to by key."""

    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    rng: Any = None
    rng_streams: tuple[str, ...] = ()
    # Storage addresses of module buffers: native kernels write some of them (BatchNorm's running
    # statistics) without bumping their version counters, so staging never trusts those counters.
    volatile: set[tuple[str, int]] = field(default_factory=set)

    def sink_for(self, pending: dict[str, torch.Tensor]):
        def sink(path: str, tensor: torch.Tensor) -> str:
            key, n = path, 1
            while key in self.tensors or key in pending or key == "__metadata__":
                n += 1
                key = f"{path}#{n}"
            pending[key] = tensor
            return key

        return sink

    def add(self, name: str, kind: str, obj_type: str, build) -> None:
        pending: dict[str, torch.Tensor] = {}
        try:
            tree = build(self.sink_for(pending))
        except Unstorable as exc:
            self.skipped[name] = f"{exc.path}: {exc.reason}" if exc.path != name else exc.reason
            return
        self.objects[name] = {"kind": kind, "type": obj_type, "tree": tree}
        self.tensors.update(pending)


def capture(state: Mapping[str, Any], *, with_rng: bool = True) -> Capture:
    """Capture named objects and values (and the global RNGs) without changing any of them."""
    result = Capture()
    before = rng.capture()
    try:
        for name, obj in state.items():
            kind = kind_of(obj)
            if kind == "generator":
                result.add(name, kind, "torch.Generator",
                           lambda sink, g=obj, n=name: encode({"state": g.get_state(), "device": str(g.device)}, n, sink))
            elif kind == "stateful":
                result.add(name, kind, type_name(obj), lambda sink, o=obj, n=name: _state_dict_tree(o, n, sink))
                if isinstance(obj, torch.nn.Module):
                    result.volatile.update(_buffer_keys(obj))
            else:
                result.add(name, kind, type_name(obj), lambda sink, o=obj, n=name: encode(o, n, sink))
    finally:
        rng.restore(before)
    if with_rng:
        pending: dict[str, torch.Tensor] = {}
        result.rng = encode(before, "rng", result.sink_for(pending))
        result.tensors.update(pending)
        result.rng_streams = tuple(before)
    return result


def storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    """(device, address) of a tensor's storage: how staging recognises memory between saves."""
    return (str(tensor.device), tensor.untyped_storage().data_ptr())


def _buffer_keys(module: torch.nn.Module) -> list[tuple[str, int]]:
    keys = []
    for buffer in module.buffers():
        try:
            keys.append(storage_key(buffer))
        except (RuntimeError, NotImplementedError):  # sparse or storage-less buffers: grouped by key anyway
            pass
    return keys


def _state_dict_tree(obj: Any, name: str, sink) -> Any:
    try:
        state = obj.state_dict()
    except Exception as exc:  # a user's state_dict() is arbitrary code
        raise Unstorable(name, f"its state_dict() raised {type(exc).__name__}: {exc}") from exc
    return encode(state, name, sink)
