"""Skipping DataLoader batches on resume without loading them.

While a runtime is active, ``DataLoader.__iter__`` is replaced by a thin wrapper. Outside a
resumed loop it only notes, for each loader iterated by a loop's iterable, whether the call reused
a persistent-worker iterator (that call draws no base seed, so a resume must know it). When a
resumed loop's iterable iterates a map-style loader through pass-through wrappers only
(``enumerate``, ``zip``, ``tqdm``, ``islice``...), the loader's iterator is built on a sampler that
first discards the batches the loop will skip, at the moment the original run drew its first
indices (so the shuffle order is the same); it then yields one cheap placeholder per skipped batch
so that the wrappers count correctly, and the loop discards them without running its body.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

from ...errors import RestoreError

if TYPE_CHECKING:
    from .activation import Activation
    from .runtime import LoopRuntime

MODULE = "torch.utils.data.dataloader"


class _Skipped:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<batch skipped by nbguard>"


SKIPPED = _Skipped()


class SkipSampler:
    """Stands in for a loader's index sampler: the first iteration starts the real one, discards
    ``count`` index batches, then yields the rest."""

    def __init__(self, sampler: Any, count: int, before: Callable[[], None] | None = None):
        self.sampler, self.count, self.before = sampler, count, before
        self.skipped: int | None = None
        self._rest: Iterator[Any] | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def start(self) -> int:
        """Draw the skipped index batches now (idempotent); how many there were."""
        if self.skipped is None:
            if self.before is not None:
                self.before()
            rest = iter(self.sampler)
            skipped = 0
            for _ in range(self.count):
                if next(rest, SKIPPED) is SKIPPED:
                    break
                skipped += 1
            self._rest, self.skipped = rest, skipped
        return self.skipped

    def __iter__(self) -> Iterator[Any]:
        self.start()
        yield from self._rest  # type: ignore[misc]


class Resumed:
    """What ``iter(loader)`` returns in a resumed loop: placeholders for the skipped batches, then
    the real ones."""

    def __init__(self, real: Iterator[Any], skipper: SkipSampler, activation: Activation):
        self.real, self.skipper, self.activation = real, skipper, activation
        self._left: int | None = None
        self._yielded = 0

    @property
    def nbguard_yielded(self) -> int:
        return self._yielded

    def __iter__(self) -> Resumed:
        return self

    def __len__(self) -> int:
        return len(self.real)  # type: ignore[arg-type]

    def __next__(self) -> Any:
        if self._left is None:
            self._left = self.skipper.start()
        if self._left:
            if not self.activation.skipping:
                raise RestoreError(
                    f"cannot resume loop {self.activation.info.id} (line {self.activation.info.lineno}) exactly: its "
                    "iterable consumes the DataLoader's batches at a different rate than the loop. Run the cell "
                    "without resuming, or iterate the DataLoader directly (enumerate, zip and tqdm are fine)")
            self._left -= 1
            self._yielded += 1
            return SKIPPED
        item = next(self.real)
        self._yielded += 1
        return item


class LoaderPatch:
    """Replaces ``DataLoader.__iter__`` for the time a runtime is active."""

    def __init__(self, runtime: LoopRuntime):
        self.runtime = runtime
        module = sys.modules[MODULE]
        self.torch = sys.modules["torch"]
        self.cls = module.DataLoader
        self.iterable_kind = module._DatasetKind.Iterable
        self.original = self.cls.__dict__["__iter__"]

        def __iter__(loader: Any) -> Any:
            return self.iterate(loader)

        self.patched = __iter__

    def install(self) -> None:
        self.cls.__iter__ = self.patched

    def uninstall(self) -> None:
        if self.cls.__dict__.get("__iter__") is self.patched:
            self.cls.__iter__ = self.original

    def iterate(self, loader: Any) -> Any:
        found = self.runtime._attribute(loader, _passes_through)
        if found is None:
            return self.original(loader)
        activation, passthrough = found
        persistent = bool(loader.persistent_workers and loader.num_workers > 0)
        reused_now = persistent and loader._iterator is not None
        plan = activation.plan
        if plan is None:
            activation.reused.append(reused_now)
            return self.original(loader)

        index = len(activation.reused)
        if not persistent:
            reused_then = False
        elif plan.reused is not None:
            reused_then = bool(index < len(plan.reused) and plan.reused[index])
        else:  # a position stored without this field: assume the loader lives outside the loops
            reused_then = reused_now or any(a.plan is not None and a.plan.completed > 0
                                            for a in self.runtime._stack[:activation.info.depth])
        activation.reused.append(reused_then)

        remaining = activation.skip - activation.skipped if activation.skipping else 0
        key = "batch_sampler" if loader.batch_sampler is not None else "sampler"
        placeholders = (remaining > 0 and passthrough and loader._dataset_kind != self.iterable_kind
                        and key in loader.__dict__)
        fresh_for_reused = reused_then and not reused_now
        if reused_now and not reused_then:
            # The original run built a new iterator here, which drew a base seed: draw it too.
            self.torch.empty((), dtype=self.torch.int64).random_(generator=loader.generator)
        if not placeholders and not fresh_for_reused:
            return self.original(loader)

        before = self._rewind_seed_draw(loader) if fresh_for_reused else None
        skipper = SkipSampler(loader._index_sampler, remaining if placeholders else 0, before)
        real = self._build(loader, key, skipper)
        if loader.num_workers > 0:
            self.runtime._note_workers(activation, loader, placeholders)
        return Resumed(real, skipper, activation) if placeholders else real

    def _build(self, loader: Any, key: str, skipper: SkipSampler) -> Any:
        """``iter(loader)`` with ``skipper`` as its index sampler for this one iteration."""
        if key not in loader.__dict__:  # a subclass that computes its sampler: leave it alone
            return self.original(loader)
        original = loader.__dict__[key]
        existing = loader._iterator if loader.persistent_workers else None
        loader.__dict__[key] = skipper  # bypasses DataLoader.__setattr__, which forbids it after __init__
        if existing is not None:
            existing._index_sampler = skipper
        real = None
        try:
            real = self.original(loader)
        finally:
            loader.__dict__[key] = original
            for holder in (existing, real):
                if holder is not None:
                    holder._index_sampler = original  # later epochs iterate the real sampler again
        return real

    def _rewind_seed_draw(self, loader: Any) -> Callable[[], None]:
        """The original run reused persistent workers here, so it drew no base seed: undo the draw of
        the new iterator before the sampler draws its own seed."""
        torch = self.torch
        state = torch.get_rng_state()
        generator = loader.generator
        generator_state = generator.get_state() if generator is not None else None

        def rewind() -> None:
            torch.set_rng_state(state)
            if generator is not None:
                generator.set_state(generator_state)

        return rewind


def _passes_through(frame: FrameType, loader: Any) -> bool:
    """Whether a frame between the cell and ``iter(loader)`` hands batches on unchanged."""
    module = frame.f_globals.get("__name__") or ""
    if module.startswith(("nbguard.training.loops", "tqdm")):
        return True
    return frame.f_locals.get("self") is loader  # a DataLoader subclass calling super().__iter__()
