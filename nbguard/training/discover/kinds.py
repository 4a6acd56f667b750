"""What counts as training state: training objects by kind, plain values, and names never state.

``classify`` says which kind of training object something is (anything with ``state_dict`` and
``load_state_dict``, plus ``torch.Generator``); ``why_not_plain`` says whether a value can be stored
without pickling, and if not, why. DataLoaders have no state of their own: ``loader_generators``
finds the generators that drive their shuffling.
"""

from __future__ import annotations

import collections
import functools
import io
import re
import sys
import types
from collections.abc import Iterable, Iterator
from typing import cast

_IPYTHON_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython"})
_IPYTHON_PRIVATE = re.compile(r"_+|_i+|_i\d+|_\d+|_oh|_dh|_ih|__nbguard__")
_LOADER_PATHS = ("generator", "sampler.generator", "batch_sampler.sampler.generator", "batch_sampler.generator")
_MAX_NESTING = 64       # how deep a plain value may nest
_NOT_STATE = "not a training object or plain value"


@functools.lru_cache(maxsize=1)
def _torch_kinds() -> tuple[tuple[tuple[type, ...], str], ...]:
    import torch

    def present(*candidates: object) -> tuple[type, ...]:
        return tuple(c for c in candidates if isinstance(c, type))

    lrs = torch.optim.lr_scheduler
    return (
        ((torch.nn.Module,), "module"),
        ((torch.optim.Optimizer,), "optimizer"),
        (present(getattr(lrs, "LRScheduler", None), getattr(lrs, "_LRScheduler", None),
                 getattr(lrs, "ReduceLROnPlateau", None)), "scheduler"),
        (present(getattr(getattr(torch, "amp", None), "GradScaler", None),
                 getattr(torch.cuda.amp, "GradScaler", None)), "scaler"),
        ((torch.Generator,), "generator"),
    )


def classify(obj: object) -> str | None:
    """The kind of training object ``obj`` is, or None.

    'module', 'optimizer', 'scheduler', 'scaler', 'generator', or 'stateful' for anything else
    whose class has callable ``state_dict`` and ``load_state_dict`` (an EMA helper, a metric).
    """
    for kinds, label in _torch_kinds():
        if kinds and isinstance(obj, kinds):
            return label
    cls = type(obj)  # looked up on the class: a class itself, or a Mock, does not count
    if callable(getattr(cls, "state_dict", None)) and callable(getattr(cls, "load_state_dict", None)):
        return "stateful"
    return None


def is_loader(obj: object) -> bool:
    """Whether ``obj`` is a torch DataLoader or Sampler (without importing torch)."""
    data = sys.modules.get("torch.utils.data")
    return data is not None and isinstance(obj, (data.DataLoader, data.Sampler))


def loader_generators(label: str, loader: object) -> Iterator[tuple[str, object]]:
    """A DataLoader has no state of its own; the generators that drive its shuffling do."""
    seen: set[int] = set()
    for path in _LOADER_PATHS:
        obj: object = loader
        for part in path.split("."):
            try:
                obj = getattr(obj, part, None)
            except Exception:  # a property that raises: nothing to capture there
                obj = None
        if obj is not None and id(obj) not in seen and classify(obj) == "generator":
            seen.add(id(obj))
            yield f"{label}.{path}", obj


def why_not_plain(value: object) -> str | None:
    """None if ``value`` is a plain value nbguard stores without pickling, else the reason.

    Plain: None, bool, int, float, complex, str, bytes, torch tensors, numpy arrays (not of
    Python objects) and numpy scalars, and lists, tuples and dicts (str/int/float/bool/None/tuple
    keys) nesting these.
    """
    return _plain(value, 0, set())


def _plain(value: object, depth: int, open_ids: set[int]) -> str | None:
    if value is None or type(value) in (bool, int, float, complex, str, bytes):
        return None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return None
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray):
        return "a numpy array of Python objects" if value.dtype.hasobject else None
    if np is not None and isinstance(value, np.generic):
        return None
    kind = type(value).__name__
    if type(value) in (list, tuple, dict, collections.OrderedDict):
        if depth >= _MAX_NESTING:
            return f"a {kind} nested more than {_MAX_NESTING} levels deep"
        open_ids.add(id(value))
        try:
            items = cast(Iterable[object], value)  # a list, tuple or dict: checked above
            if isinstance(value, dict):
                for key in value:
                    if not (key is None or type(key) in (str, int, float, bool, tuple)):
                        return f"a dict with a {type(key).__name__} key"
                items = (*value.keys(), *value.values())
            for item in items:
                if id(item) in open_ids:
                    return f"a {kind} that contains itself"
                inner = _plain(item, depth + 1, open_ids)
                if inner is not None:
                    return f"a {kind} holding {inner}"
        finally:
            open_ids.discard(id(value))
        return None
    if isinstance(value, types.ModuleType):
        return "a module"
    if isinstance(value, type):
        return "a class"
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)):
        return "a function"
    if isinstance(value, io.IOBase):
        return "an open file"
    return f"a {kind}: {_NOT_STATE}"


def ignored(name: str) -> bool:
    """IPython's own names and private names (leading underscore) are never state."""
    return name.startswith("_") or name in _IPYTHON_NAMES


def ipython_variable(name: str) -> bool:
    """Whether ``name`` is one of IPython's own variables ('In', '_', '_i3', '_oh')."""
    return name in _IPYTHON_NAMES or _IPYTHON_PRIVATE.fullmatch(name) is not None
