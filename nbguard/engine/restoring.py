"""Restoring a snapshot into live objects, all or nothing.

1. Check, reading no tensor bytes: every object is there and of the right kind, every name, shape
   and dtype fits (trees decode to placeholders), every blob header agrees with the manifest.
2. Check every byte. Through a ``Guard`` (``staging``), a contiguous CPU storage torch allocated is
   read into its group's staging buffer (a warm one, or new memory claimed for it where the staging
   memory fits: a resume whose prepare is still running) and hashed as it lands, in disk order;
   at step 3 the live storage and the buffer exchange memory (``_swap_data_ptr_``: every tensor that
   shares the storage sees it), so the bytes checked are the bytes used, and the buffer holds the
   displaced ones for the next save to copy over. Other storages that go straight into a live
   tensor's memory are hashed, one after another in the order they lie on the disk, where their
   pages lie in the page cache (``hash_ranges``: a read-ahead thread reads in the next 16 MiB piece,
   across storages and files, while one is hashed; the pages stay cached and the blob files stay
   open); the rest is read into fresh memory.
3. Apply, keeping an undo record for every change: staged memory is exchanged (undone by exchanging
   again), fresh bytes are swapped into live tensors (the fresh memory then holds the displaced
   bytes), each ``load_state_dict`` is called with the live tensors themselves as sources (a no-op
   copy), namespace values and RNG states are set.
   Anything that raises (a ``load_state_dict`` too) undoes every change and names the object.
   Last, each blob file hashed in step 2 must still be the same unchanged file (device, inode,
   size, mtime and ctime, by ``fstat`` of the open descriptor): one replaced or written since
   undoes everything too.
4. Copy the remaining storages from the page cache into the live tensors' memory, two threads at
   a time. This is the one step that cannot be undone, so it reads nothing that was not hashed:
   the copies come through the descriptors that step 2 hashed, with ``RWF_NOWAIT`` (page cache
   only, never the disk); a storage some of whose pages left the cache is read from the disk and
   hashed again instead, and each file's identity is checked again after its copy. It fails only
   if a file is written or the disk fails during this step, and then says which objects are partly
   restored.

   Not re-hashing the copies (step 4 costs a memory copy, not a copy and a hash) leaves one hole:
   a cached page whose bytes change without the file's mtime/ctime changing between steps 2 and 4
   (a memory error, a write to the raw block device, or a page evicted and read back from a
   silently failing disk by another process in between) is not noticed. Storages exchanged with a
   guard's staging memory (step 2) have no such gap.

Peak memory: the live state (and a guard's staging memory) plus two 16 MiB buffers, plus the fresh
memory of what cannot go in place (GPU tensors, optimizer state before its first step, schedulers,
values).
"""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CorruptSnapshotError, NbguardError, RestoreError, UsageError
from ..stores.directio import PIECE
from . import rng as rng_streams
from .fit import Item, check_fits, describe
from .report import ProgressFn, RestoreReport

if TYPE_CHECKING:
    from .snapshot import Snapshot
    from .staging import StagingArea

Undo = Callable[[], object]


# Exchanges the memory of two storages of one size, for every tensor that uses either (a private torch
# method, checked on 2.13; where a torch lacks it, restores copy into live memory as before).
_CAN_EXCHANGE = hasattr(torch.UntypedStorage, "_swap_data_ptr_")


@dataclass
class _Placement:
    direct: dict[str, tuple[torch.Tensor, str]] = field(default_factory=dict)  # storage -> (live tensor, owner)
    staged: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = field(default_factory=dict)  # storage -> (live, buffer, owner)
    swap: dict[str, tuple[str, torch.Tensor, str]] = field(default_factory=dict)  # storage -> (key, live, owner)
    sources: dict[str, torch.Tensor] = field(default_factory=dict)  # tensor key -> live tensor handed to load


def restore(snapshot: Snapshot, objects: Mapping[str, Any], *, namespace: MutableMapping[str, Any] | None,
            only: Iterable[str] | None, rng: bool, progress: ProgressFn | None,
            staging: StagingArea | None = None) -> RestoreReport:
    """``Snapshot.restore``: see there and the module's docstring. ``staging``: a guard's staging
    buffers, which storages are read into and then exchanged with the live ones (no write into live
    memory is done by then), if nothing else may use them meanwhile (the guard's writer is idle)."""
    names = list(only) if only is not None else list(snapshot.manifest["objects"])
    unknown = [n for n in names if n not in snapshot.manifest["objects"]]
    if unknown:
        raise UsageError(f"snapshot {snapshot.id} holds no {', '.join(map(repr, unknown))}; it holds "
                         f"{', '.join(snapshot.names)}")
    if snapshot._handed_out:  # hashes checked by latest_good() still hold; tensors given out do not
        verified, checked_in = set(snapshot._verified), dict(snapshot._checked_in)
        snapshot._forget()
        snapshot._verified |= verified
        snapshot._checked_in |= checked_in
    report = RestoreReport(snapshot.info)
    try:
        items = _plan(snapshot, names, objects, namespace, report)
        rng_tree = snapshot.manifest["rng"] if rng else None
        for item in items:
            shape = snapshot._decode(item.tree)
            if item.kind != "value":
                check_fits(item, snapshot.tree(item.name)["type"], shape)
        if rng_tree is not None:
            snapshot._decode(rng_tree)
        placement = _place(snapshot, items, staging)
        advance = _check_bytes(snapshot, items, placement, rng_tree, progress)
        states = [snapshot._materialize(item.tree, _source(snapshot, placement)) for item in items]
        for item, state in zip(items, states, strict=True):
            if item.kind == "generator":
                _check_generator(item.name, item.live, state)
        rng_state = snapshot._materialize(rng_tree) if rng_tree is not None else None
        if rng_state is not None:
            rng_streams.check(rng_state)
        _apply_all(snapshot, items, states, placement, rng_state, namespace, report, advance)
    finally:
        snapshot._forget()  # the live objects own the restored tensors now: read afresh next time
    return report


# -- what goes where ---------------------------------------------------------------------------------
def _plan(snapshot: Snapshot, names: list[str], objects: Mapping[str, Any],
          namespace: MutableMapping[str, Any] | None, report: RestoreReport) -> list[Item]:
    items, skipped = [], []
    for name in names:
        entry = snapshot.tree(name)
        kind = entry["kind"]
        from_namespace = name not in objects
        reason = _protected(name, namespace) if from_namespace and namespace is not None else None
        if reason:
            skipped.append(f"{name} ({reason})")
            continue
        if kind == "value":
            items.append(Item(name, kind, None, entry["tree"]))
            continue
        live = objects.get(name) if not from_namespace else namespace.get(name) if namespace is not None else None
        if live is None:
            report.missing.append(name)
            continue
        items.append(Item(name, "generator" if kind == "generator" else "stateful", live, entry["tree"]))
    if skipped:
        report.skipped.extend(skipped)
        report.notes.append("left as they are in your session (a snapshot never replaces these): " + ", ".join(skipped))
    return items


def _protected(name: str, namespace: Mapping[str, Any]) -> str | None:
    """Why ``name`` must not be replaced in a notebook's namespace, or None."""
    if name.startswith("__"):
        return "a Python internal name"
    current = namespace.get(name)
    if isinstance(current, types.ModuleType):
        return "a module"
    return None


def _place(snapshot: Snapshot, items: list[Item], staging: StagingArea | None = None) -> _Placement:
    """Which storages are read into a guard's staging buffer (warm, or claimed now:
    ``StagingArea.claim``) whose memory then changes places with the live storage's (``staged``),
    which go straight into live memory (``direct``: contiguous CPU tensors), which are read into
    fresh memory and swapped in (``swap``: GPU or strided tensors), and the rest."""
    where: dict[str, tuple[torch.Tensor, str]] = {}
    for item in items:
        for key in item.in_place:
            where[key] = (item.pairs[key], item.name)
    users: dict[str, list[str]] = {}
    for key, spec in snapshot.manifest["tensors"].items():
        users.setdefault(spec["storage"], []).append(key)
    candidates: list[tuple[str, list[str], torch.Tensor, str]] = []
    regions: dict[tuple, int] = {}
    for storage in dict.fromkeys(snapshot.manifest["tensors"][k]["storage"] for k in where):
        keys = users[storage]
        if not all(k in where for k in keys):
            continue  # shared with something restored another way (or not at all)
        first, owner = where[keys[0]]
        specs = [snapshot.manifest["tensors"][k] for k in keys]
        same = all(_same_region(where[k][0], first) and s["byte_offset"] == specs[0]["byte_offset"]
                   and s["stride"] == specs[0]["stride"] for k, s in zip(keys, specs, strict=True))
        if same and first.numel():
            candidates.append((storage, keys, first, owner))
            region = (first.device, first.data_ptr())
            regions[region] = regions.get(region, 0) + 1
    # one live tensor filled from two stored ones: load_state_dict decides, as in torch
    candidates = [c for c in candidates if regions[(c[2].device, c[2].data_ptr())] == 1]
    sizes = {storage: snapshot.manifest["storages"][storage]["nbytes"] for storage, *_ in candidates}
    plain = {storage: first.is_contiguous() and snapshot.placeholder(keys[0]).is_contiguous()
             and first.numel() * first.element_size() == sizes[storage] for storage, keys, first, _ in candidates}
    # Through a guard, every storage that can change memory with a staging buffer does: a warm one,
    # or one claimed now (a resume whose prepare has not reached it yet), read once and kept.
    exchangeable = {storage: sizes[storage] for storage, _, first, _ in candidates
                    if plain[storage] and _exchangeable(first, sizes[storage])}
    buffers = staging.claim(exchangeable) if staging is not None and exchangeable else {}
    placement = _Placement()
    for storage, keys, first, owner in candidates:
        buffer = buffers.get(storage)
        if buffer is not None:
            placement.staged[storage] = (first, buffer, owner)
        elif plain[storage] and first.device.type == "cpu":
            placement.direct[storage] = (first, owner)
        else:
            placement.swap[storage] = (keys[0], first, owner)
        for k in keys:
            placement.sources[k] = where[k][0]
    return placement


def _exchangeable(live: torch.Tensor, nbytes: int) -> bool:
    """Whether the memory of ``live``'s storage may change places with a staging buffer's: a pageable
    CPU storage torch allocated (not NumPy's, a file's or shared memory, whose other users would keep
    the old bytes), holding exactly these ``nbytes``. Every tensor that shares the storage (a view,
    ``.data``, a tied weight, the optimizer's key) sees the exchanged memory: sharing is kept. Only a
    raw address kept outside torch (``data_ptr()`` in a C extension) would still point at the old
    memory, as after ``load_state_dict(assign=True)`` or ``module.to()``."""
    storage = live.untyped_storage()
    # resizable() is False for memory torch does not own and for storages ``.numpy()`` was called on
    # (the array would keep the old memory); nbguard itself never calls it on live tensors.
    return (_CAN_EXCHANGE and live.device.type == "cpu" and live.storage_offset() == 0 and storage.nbytes() == nbytes
            and storage.resizable() and not storage.is_shared() and not storage.is_pinned()
            and not getattr(storage, "filename", None))


def _exchange(live: torch.Tensor, buffer: torch.Tensor) -> None:
    """Make ``live``'s storage use ``buffer``'s memory and the buffer the storage's former memory."""
    live.untyped_storage()._swap_data_ptr_(buffer.untyped_storage())  # type: ignore[attr-defined]  # private


def _same_region(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.device, a.data_ptr(), a.shape, a.stride(), a.dtype) == (b.device, b.data_ptr(), b.shape, b.stride(), b.dtype)


def _source(snapshot: Snapshot, placement: _Placement) -> Callable[[str], torch.Tensor]:
    def source(key: str) -> torch.Tensor:
        live = placement.sources.get(key)
        return live if live is not None else snapshot._tensor(key)
    return source


def _progress(total: int, progress: ProgressFn | None) -> Callable[[int], None] | None:
    if progress is None:
        return None
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress(min(done, total), total)
    return advance


def _check_bytes(snapshot: Snapshot, items: list[Item], placement: _Placement, rng_tree: Any,
                 progress: ProgressFn | None) -> Callable[[int], None] | None:
    """Every byte checked before anything changes: in-place storages hashed (kept in the page
    cache only), the others read into fresh memory."""
    from ..format.codec import tensor_refs

    refs = [ref for item in items for ref in tensor_refs(item.tree)]
    if rng_tree is not None:
        refs += tensor_refs(rng_tree)
    fresh = [k for k in dict.fromkeys(snapshot._spec(r)["storage"] for r in refs)
             if k not in placement.direct and k not in placement.staged]
    sizes = snapshot.manifest["storages"]
    total = 2 * sum(sizes[k]["nbytes"] for k in placement.direct) + \
        sum(sizes[k]["nbytes"] for k in [*fresh, *placement.staged])
    advance = _progress(total, progress)
    # Storages hashed before (``Catalog.latest_good``) are copied from the page cache, as ``direct`` ones
    # are at the end; the others are read and hashed as they land.
    checked = {key for key in placement.staged if snapshot.was_checked(key)}
    snapshot.read_all_into({key: buffer for key, (_, buffer, _) in placement.staged.items() if key not in checked},
                           advance)
    for key in checked:
        snapshot.read_into(key, placement.staged[key][1], advance)
    snapshot.check_all(placement.direct, advance)
    for key in fresh:
        snapshot.storage(key, advance)
    return advance


def _check_generator(name: str, live: torch.Generator, state: Any) -> None:
    saved = state.get("state")
    try:
        torch.Generator(device=live.device).set_state(saved.to("cpu", torch.uint8).contiguous())
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptSnapshotError(f"the saved state of {name} does not fit a {live.device} generator: {exc}") from exc


# -- applying, with an undo record ---------------------------------------------------------------------
def _apply_all(snapshot: Snapshot, items: list[Item], states: list[Any], placement: _Placement,
               rng_state: Any, namespace: MutableMapping[str, Any] | None, report: RestoreReport,
               advance: Callable[[int], None] | None) -> None:
    undo: list[Undo] = []
    current = "the random number generators"
    try:
        for item, state in zip(items, states, strict=True):
            current = item.name
            _apply(item, state, placement, snapshot, namespace, report, undo)
        current = "the random number generators"
        if rng_state:
            before = rng_streams.capture()
            undo.append(lambda: rng_streams.restore(before))
            report.rng = rng_streams.restore(rng_state)
    except BaseException as exc:
        failed = _undo(undo)
        if isinstance(exc, NbguardError) or not isinstance(exc, Exception):
            raise
        raise RestoreError(f"{current} refused the snapshot's state: {type(exc).__name__}: {exc}. Nothing was "
                           f"restored{failed}; create {current} the same way as when the snapshot was taken, or "
                           f"leave it out with only=[...]") from exc
    try:
        snapshot.ensure_unchanged(placement.direct)  # the last moment anything can still be undone
    except BaseException as exc:
        failed = _undo(undo)
        if isinstance(exc, CorruptSnapshotError):
            raise CorruptSnapshotError(f"{exc}. Nothing was restored{failed}: restore again") from exc
        raise
    done: set[str] = set()
    try:
        for storage, (target, owner) in placement.direct.items():
            done.add(owner)
            snapshot.read_into(storage, target, advance)
    except BaseException as exc:
        failed = _undo(undo)
        if not isinstance(exc, Exception):
            raise
        message = (f"{exc} (while reading the snapshot into the memory of {', '.join(sorted(done))}, after every check "
                   f"had passed: the file changed or the disk failed). {', '.join(sorted(done))} "
                   f"{'is' if len(done) == 1 else 'are'} partly restored, everything else is as it was{failed}: "
                   "restore again, or from an earlier snapshot")
        error = type(exc)(message) if isinstance(exc, NbguardError) else RestoreError(message)
        error.partly_restored = True  # type: ignore[attr-defined]  # what Guard.restore('latest') must not retry over
        raise error from exc


def _undo(undo: list[Undo]) -> str:
    """Run the undo record backwards; a note for each step that failed (it still runs the rest)."""
    problems = []
    for step in reversed(undo):
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - the user's load_state_dict: keep undoing the others
            problems.append(f"{type(exc).__name__}: {exc}")
    undo.clear()
    return f" (but putting some state back failed: {'; '.join(problems)})" if problems else ""


def _apply(item: Item, state: Any, placement: _Placement, snapshot: Snapshot,
           namespace: MutableMapping[str, Any] | None, report: RestoreReport, undo: list[Undo]) -> None:
    name, live = item.name, item.live
    if item.kind == "value":
        current = namespace.get(name) if namespace is not None else None
        value = _to_device_like(state, current)
        report.values[name] = value
        if namespace is not None:
            if name in namespace:
                undo.append(lambda: namespace.__setitem__(name, current))
            else:
                undo.append(lambda: namespace.pop(name, None))
            namespace[name] = value
        report.restored.append((name, type(value).__name__))
        return
    if item.kind == "generator":
        before = live.get_state()
        undo.append(lambda: live.set_state(before))
        live.set_state(state["state"].to("cpu", torch.uint8).contiguous())
        report.restored.append((name, "torch.Generator"))
        return
    before = _state_before(live)
    if not isinstance(live, torch.nn.Module) or any(not isinstance(v, torch.Tensor) for v in before.values()):
        undo.append(lambda: live.load_state_dict(before))  # (a model's tensors are put back below)
    if isinstance(live, torch.nn.Module):
        # tensors load_state_dict will copy into (not placed): keep their bytes
        kept = [(t, t.clone()) for k, t in item.pairs.items() if k not in placement.sources]
        undo.append(lambda: _put_back(kept))
    for target, buffer, owner in placement.staged.values():
        if owner == name:
            undo.append(functools.partial(_exchange, target, buffer))
            _exchange(target, buffer)  # the checked bytes are live now; the buffer holds the displaced ones
    for key, target, owner in placement.swap.values():
        if owner == name:
            fresh = snapshot._tensor(key)
            undo.append(functools.partial(_swap, target, fresh))
            _swap(target, fresh)  # the fresh memory now holds the displaced bytes
    live.load_state_dict(state)
    report.restored.append((name, describe(live)))


def _state_before(live: Any) -> Any:
    """What undoes a load_state_dict: the live tensors themselves for models and optimizers (their
    bytes are put back separately), a deep copy of anything else."""
    state = live.state_dict()
    if isinstance(live, torch.nn.Module):
        return state
    if isinstance(live, torch.optim.Optimizer):
        return {"state": state["state"], "param_groups": copy.deepcopy(state["param_groups"])}
    try:
        return copy.deepcopy(state)
    except Exception:  # noqa: BLE001 - an object deepcopy cannot copy: keep the references
        return state


def _put_back(kept: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for target, old in kept:
            target.copy_(old)


def _swap(live: torch.Tensor, fresh: torch.Tensor) -> None:
    """Exchange the contents of two tensors of one shape and dtype, through one piece of memory."""
    with torch.no_grad():
        if live.is_contiguous() and fresh.is_contiguous():
            a, b = live.view(-1), fresh.view(-1)
            step = max(1, PIECE // live.element_size())
            spare = torch.empty(min(step, a.numel()), dtype=live.dtype, device=fresh.device)
            for start in range(0, a.numel(), step):
                end = min(start + step, a.numel())
                piece = spare[:end - start]
                piece.copy_(a[start:end])
                a[start:end].copy_(b[start:end])
                b[start:end].copy_(piece)
        else:
            old = live.clone()
            live.copy_(fresh)
            fresh.copy_(old)


def _to_device_like(value: Any, current: Any) -> Any:
    """A restored tensor goes where the live one of the same name is (a GPU snapshot restores on a
    CPU-only machine, and back)."""
    if isinstance(value, torch.Tensor) and isinstance(current, torch.Tensor):
        return value.to(current.device)
    return value
