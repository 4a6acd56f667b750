"""The local variables of the user's functions that a safe point interrupts, saved and put back.

When the training loop lives in a function (``train_model()``, ``train_loop()``), its running
totals, best score and best weights are local variables of a frame, not notebook variables. At a
safe point they are captured under ``"<function>:<variable>"``; on resume, once the function's loop
has skipped to the saved position, they are written back into the new call's frame (training
objects the function created itself are restored in place, like the notebook's).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from types import FrameType
from typing import Any

from .discover import classify, why_not_plain

SEPARATOR = ":"

#: (index in the loop path, function name, frame): what ``SafePoint.frames`` and
#: ``LoopRuntime.frames`` give.
PathFrame = tuple[int, str, FrameType]


def _prefixes(frames: list[PathFrame]) -> list[str]:
    names = [name for _, name, _ in frames]
    return [name if names.count(name) == 1 else f"{name}#{index}" for index, name, _ in frames]


def capture_locals(frames: list[PathFrame], taken: Mapping[str, Any], skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """State entries for the frames' locals: training objects and plain values, except objects
    already in ``taken`` (a model passed in as an argument is saved once, under its notebook name),
    private names and ``skip`` (loop variables: the batch is loaded again anyway)."""
    known = {id(v) for v in taken.values()}
    out: dict[str, Any] = {}
    for prefix, (_, _, frame) in zip(_prefixes(frames), frames, strict=True):
        for name, value in frame.f_locals.items():
            if name.startswith("_") or name in skip or id(value) in known:
                continue
            if classify(value) is not None or why_not_plain(value) is None:
                out[f"{prefix}{SEPARATOR}{name}"] = value
            elif _users_object(value, frame):
                # `self` of a method of the notebook's class: its plain attributes (self.history,
                # self.best_acc) are state too; its training objects are found by discovery.
                for attr, item in vars(value).items():
                    if not attr.startswith("_") and id(item) not in known and why_not_plain(item) is None:
                        out[f"{prefix}{SEPARATOR}{name}.{attr}"] = item
    return out


def _users_object(value: Any, frame: FrameType) -> bool:
    """An instance of a class whose methods were compiled in the guarded code's own globals."""
    methods = vars(type(value)).values() if hasattr(value, "__dict__") else ()
    return any(getattr(m, "__globals__", None) is frame.f_globals for m in methods)


def write_locals(frame: FrameType, values: Mapping[str, Any]) -> None:
    """Assign local variables of a live (suspended) frame."""
    if not values:
        return
    if sys.version_info >= (3, 13):
        proxy = frame.f_locals  # PEP 667: a write-through view of the frame
        for name, value in values.items():
            proxy[name] = value
        return
    snapshot = frame.f_locals  # refreshed from the frame by this access
    snapshot.update(values)
    ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))


class FrameNamespace(MutableMapping[str, Any]):
    """A namespace for ``Snapshot.restore``: ``"<function>:<variable>"`` names go to the frames on the
    loop path, every other name to the notebook's namespace. Writes to frames are collected and
    applied by ``apply()`` (one write per frame)."""

    def __init__(self, namespace: MutableMapping[str, Any], frames: list[PathFrame]):
        self.namespace = namespace
        self.frames = dict(zip(_prefixes(frames), (frame for _, _, frame in frames), strict=True))
        self.pending: dict[str, dict[str, Any]] = {}

    def _split(self, key: str) -> tuple[FrameType, str] | None:
        prefix, sep, name = key.partition(SEPARATOR)
        frame = self.frames.get(prefix) if sep else None
        return (frame, name) if frame is not None else None

    def __getitem__(self, key: str) -> Any:
        where = self._split(key)
        if where is None:
            return self.namespace[key]
        frame, name = where
        pending = self.pending.get(key.partition(SEPARATOR)[0], {})
        if name in pending:
            return pending[name]
        local, _, attr = name.partition(".")
        value = frame.f_locals[local]
        if attr:
            try:
                return getattr(value, attr)
            except AttributeError:
                raise KeyError(key) from None
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        where = self._split(key)
        if where is None:
            self.namespace[key] = value
        else:
            self.pending.setdefault(key.partition(SEPARATOR)[0], {})[where[1]] = value

    def __delitem__(self, key: str) -> None:
        if self._split(key) is None:
            del self.namespace[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.namespace)

    def __len__(self) -> int:
        return len(self.namespace)

    def apply(self) -> list[str]:
        """Write the collected values into their frames; the names written. A list or dict is
        refilled in place: the suspended code may already hold it (``log.append(train())`` looked
        ``log.append`` up before the call that is being resumed)."""
        written = []
        for prefix, values in self.pending.items():
            frame = self.frames[prefix]
            current = frame.f_locals
            rebound = {}
            for name, value in values.items():
                local, _, attr = name.partition(".")
                if attr:  # an attribute of a local object (self.history)
                    owner = current.get(local)
                    live = getattr(owner, attr, None)
                    if isinstance(live, list) and type(live) is type(value):
                        live[:] = value
                    elif isinstance(live, dict) and type(live) is type(value):
                        live.clear()
                        live.update(value)
                    elif owner is not None:
                        setattr(owner, attr, value)
                    continue
                live = current.get(name)
                if isinstance(live, list) and type(live) is type(value):
                    live[:] = value
                elif isinstance(live, dict) and type(live) is type(value):
                    live.clear()
                    live.update(value)
                else:
                    rebound[name] = value
            write_locals(frame, rebound)
            written += [f"{prefix}{SEPARATOR}{name}" for name in values]
        self.pending.clear()
        return written
