"""Seeing writes that torch's version counter misses.

Every in-place op on a tensor (an optimizer step, ``copy_`` under ``no_grad``, ``load_state_dict``)
bumps ``tensor._version``, which nbguard compares between saves to skip unchanged tensors. A few
doors bypass that counter: ``p.data`` (a new tensor with its own counter over the same memory),
``.numpy()`` / ``__array__``, ``untyped_storage()`` and DLPack. While change tracking is on, these
doors are wrapped so that the storage they expose is marked: a ``.data`` view is kept (weakly)
and its own counter is watched; memory handed to NumPy is not trusted while any array over it lives
(every view of such an array keeps the array's base alive: that is what is watched), and memory handed to DLPack is never trusted again.

Not seen: writes through a raw pointer (``data_ptr()`` with ctypes or a C extension) or through an
``untyped_storage()`` object kept across two snapshots. The README lists these limits.
"""

from __future__ import annotations

import threading
import weakref

import torch

_TensorBase = torch._C.TensorBase
_data = _TensorBase.data
raw_numpy = _TensorBase.numpy
raw_untyped_storage = _TensorBase.untyped_storage


def storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    """(device, address) of a tensor's storage, read without marking it."""
    return (str(tensor.device), raw_untyped_storage(tensor).data_ptr())


class EscapeLog:
    """Storages exposed through a door that bypasses the version counter.

    Every exposure gets a number from a counter shared by the process; each staging area remembers the
    number it had reached at its last save, so two Guards in one process never hide a write from each
    other."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # weakref callbacks may run inside a locked section
        self._count = 0
        self._last: dict[tuple[str, int], int] = {}
        self._never_trusted: set[tuple[str, int]] = set()
        self._numpy: dict[tuple[str, int], list[weakref.ref]] = {}  # tensors that handed memory to NumPy
        self._views: dict[tuple[str, int], list[list]] = {}  # [weakref, version last seen]

    def _bump(self, key: tuple[str, int]) -> None:
        self._count += 1
        self._last[key] = self._count

    def now(self) -> int:
        """The counter: exposures after this moment have larger numbers."""
        with self._lock:
            return self._count

    def note_view(self, view: torch.Tensor) -> None:
        key = storage_key(view)
        with self._lock:
            self._bump(key)
            views = [v for v in self._views.get(key, ()) if v[0]() is not None]
            views.append([weakref.ref(view), view._version])
            self._views[key] = views

    def note_exposed(self, tensor: torch.Tensor, *, forever: bool = False, array: object = None) -> None:
        key = storage_key(tensor)
        with self._lock:
            if forever:
                self._never_trusted.add(key)
            elif array is not None:
                owner = getattr(array, "base", None)
                try:
                    # When the last array goes, that moment counts as an exposure: it may have written just before.
                    ref = weakref.ref(owner if owner is not None else array, lambda _ref, key=key: self._gone(key))
                    self._numpy.setdefault(key, []).append(ref)
                except TypeError:  # not weakly referenceable: distrust for good
                    self._never_trusted.add(key)
            else:
                self._bump(key)

    def _gone(self, key: tuple[str, int]) -> None:
        with self._lock:
            self._bump(key)
            refs = [ref for ref in self._numpy.get(key, ()) if ref() is not None]
            if refs:
                self._numpy[key] = refs
            else:
                self._numpy.pop(key, None)

    def may_have_changed(self, key: tuple[str, int], since: int) -> bool:
        """Whether memory of this storage may have been written unseen after counter value ``since``."""
        with self._lock:
            if key in self._never_trusted:
                return True
            if any(ref() is not None for ref in self._numpy.get(key, ())):
                return True
            for entry in self._views.get(key, ()):
                view = entry[0]()
                if view is not None and view._version != entry[1]:
                    entry[1] = view._version  # a write through a kept .data view: an exposure now
                    self._bump(key)
            return self._last.get(key, 0) > since


LOG = EscapeLog()
_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Wrap the doors (once per process). Their behaviour is unchanged."""
    global _installed
    with _install_lock:
        if _installed:
            return
        original_numpy = torch.Tensor.numpy
        original_array = torch.Tensor.__array__
        original_storage = torch.Tensor.untyped_storage
        original_dlpack = torch.Tensor.__dlpack__

        def data_get(self: torch.Tensor) -> torch.Tensor:
            view = _data.__get__(self)
            LOG.note_view(view)
            return view

        def data_set(self: torch.Tensor, value: torch.Tensor) -> None:
            _data.__set__(self, value)

        def numpy(self: torch.Tensor, *args, **kwargs):
            result = original_numpy(self, *args, **kwargs)
            LOG.note_exposed(self, array=result)
            return result

        def array(self: torch.Tensor, *args, **kwargs):
            result = original_array(self, *args, **kwargs)
            LOG.note_exposed(self, array=result)
            return result

        def untyped_storage(self: torch.Tensor):
            LOG.note_exposed(self, forever=False)
            return original_storage(self)

        def dlpack(self: torch.Tensor, *args, **kwargs):
            LOG.note_exposed(self, forever=True)
            return original_dlpack(self, *args, **kwargs)

        torch.Tensor.data = property(data_get, data_set, doc=_data.__doc__)
        torch.Tensor.numpy = numpy
        torch.Tensor.__array__ = array
        torch.Tensor.untyped_storage = untyped_storage
        torch.Tensor.__dlpack__ = dlpack
        _installed = True
