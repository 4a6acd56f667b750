"""How far an iterator has got, read on demand, so that a ``for`` loop runs on the real iterator.

``readable(it)`` returns a reader giving the number of items ``it`` has yielded so far, or None
when that cannot be known (generators, ``zip``, ``map``, tqdm, unknown types); those get
``counted(it)``, a C-level ``map(itemgetter(1), enumerate(it))`` that passes the items through.
"""

from __future__ import annotations

import collections
import itertools
import operator
import sys
from collections.abc import Callable, Iterator
from typing import Any

Reader = Callable[[Any], int]

_SECOND = operator.itemgetter(1)
FOREVER = sys.maxsize


def _enumerate_count(it: Any) -> int:  # an enumerate: (iterable, count) in its __reduce__
    return it.__reduce__()[1][1]


def _reduce_index(it: Any) -> int:
    state = it.__reduce__()
    return state[2] if len(state) > 2 else -1  # -1: exhausted (never read at a safe point)


def _types(*samples: Any) -> tuple[type, ...]:
    return tuple({type(iter(sample)) for sample in samples})


# Immutable sequences and containers that cannot change size while iterated: the remaining length
# tells the position. Mutable sequences (lists) are read from their pickled index instead.
_BY_LENGTH = _types(range(1), range(2**64), (), "", "é", b"", {}, {}.values(), {}.items(), set(), reversed({}),
                    frozenset(), reversed([]))
_BY_INDEX = _types([], bytearray())


class _Sequence:
    def __getitem__(self, i: int) -> int:
        raise IndexError


_BY_INDEX += _types(_Sequence())  # the generic sequence iterator (numpy arrays, old-style sequences)
_PURE = _BY_LENGTH + _BY_INDEX  # iterating them has no side effect: skipping may run at C speed


def readable(it: Iterator[Any]) -> tuple[Reader, int] | None:
    """``(reader, offset)`` such that ``reader(it) - offset`` is the number of items yielded from
    now on, or None when ``it`` gives no such figure."""
    kind = type(it)
    if kind in _BY_LENGTH:
        return _length_reader(it)
    if kind in _BY_INDEX:
        return _reduce_index, _reduce_index(it)
    if kind is enumerate:
        return _enumerate_count, _enumerate_count(it)
    loader_iter = _dataloader_iter_type()
    if loader_iter is not None and isinstance(it, loader_iter):
        return _num_yielded, _num_yielded(it)
    yielded = getattr(kind, "nbguard_yielded", None)  # our own wrappers (see dataloaders.py)
    if isinstance(yielded, property):
        return _yielded, _yielded(it)
    return None


def _length_reader(it: Any) -> tuple[Reader, int]:
    return _negative_hint, -it.__length_hint__()


def _negative_hint(it: Any) -> int:
    return -it.__length_hint__()


def _num_yielded(it: Any) -> int:
    return it._num_yielded


def _yielded(it: Any) -> int:
    return it.nbguard_yielded


def _dataloader_iter_type() -> type | None:
    module = sys.modules.get("torch.utils.data.dataloader")
    return getattr(module, "_BaseDataLoaderIter", None)


def counted(it: Iterator[Any]) -> tuple[Iterator[Any], enumerate]:
    """``it`` behind a pass-through wrapper whose count can be read: ``(wrapped, counter)``."""
    counter = enumerate(it)
    return map(_SECOND, counter), counter


def counter_reader() -> tuple[Reader, int]:
    return _enumerate_count, 0


def ticks(start: int) -> tuple[Iterator[tuple[()]], Reader, int]:
    """The counter of a rewritten ``while`` loop: yields ``()`` forever, ``start`` iterations in."""
    it = itertools.repeat((), FOREVER - start)
    return it, _negative_hint, -FOREVER


def skip_fast(it: Iterator[Any], count: int) -> bool:
    """Consume ``count`` items at C speed when iterating ``it`` has no side effects; False otherwise."""
    if type(it) not in _PURE:
        return False
    collections.deque(itertools.islice(it, count), maxlen=0)
    return True
