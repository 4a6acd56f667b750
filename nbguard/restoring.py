"""Restoring a snapshot into live objects, all or nothing.

1. Check, reading no tensor bytes: every object is there and of the right kind, every name, shape
   and dtype fits (trees decode to placeholders), every blob header agrees with the manifest.
2. Check every byte: storages that go straight into a live tensor's memory are hashed through a
   small reused buffer (their pages stay in the page cache); the rest is read into fresh memory.
3. Apply, keeping an undo record for every change: fresh bytes are swapped into live tensors (the
   fresh memory then holds the displaced bytes), each ``load_state_dict`` is called with the live
   tensors themselves as sources (a no-op copy), namespace values and RNG states are set.
   Anything that raises (a ``load_state_dict`` too) undoes every change and names the object.
4. Read the remaining storages straight into the live tensors' memory, hashing them again. This
   is the one step that cannot be undone; it fails only if a checked file changes under us or the
   disk fails, and then says which objects are partly restored.

Peak memory: the live state plus one 16 MiB piece per reader, plus the fresh memory of what cannot
go in place (GPU tensors, optimizer state before its first step, schedulers, values).
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import rng as rng_streams
from .capture import kind_of, type_name
from .directio import PIECE
from .errors import CorruptSnapshotError, NbguardError, RestoreError, UsageError
from .snapshot import Placeholder, ProgressFn, RestoreReport, Snapshot

Undo = Callable[[], None]


@dataclass
class _Item:
    """One object (or value) to restore, and how its stored tensors meet live ones."""

    name: str
    kind: str  # "value", "generator" or "stateful"
    live: Any
    tree: Any
    pairs: dict[str, torch.Tensor] = field(default_factory=dict)  # tensor key -> the live tensor it fills
    in_place: set[str] = field(default_factory=set)  # keys whose bytes may land in the live tensor itself


@dataclass
class _Placement:
    direct: dict[str, tuple[torch.Tensor, str]] = field(default_factory=dict)  # storage -> (live tensor, owner)
    swap: dict[str, tuple[str, torch.Tensor, str]] = field(default_factory=dict)  # storage -> (key, live, owner)
    sources: dict[str, torch.Tensor] = field(default_factory=dict)  # tensor key -> live tensor handed to load


def restore(snapshot: Snapshot, objects: Mapping[str, Any], *, namespace: MutableMapping[str, Any] | None,
            only: Iterable[str] | None, rng: bool, progress: ProgressFn | None) -> RestoreReport:
    """``Snapshot.restore``: see there and the module's docstring."""
    names = list(only) if only is not None else list(snapshot.manifest["objects"])
    unknown = [n for n in names if n not in snapshot.manifest["objects"]]
    if unknown:
        raise UsageError(f"snapshot {snapshot.id} holds no {', '.join(map(repr, unknown))}; it holds "
                         f"{', '.join(snapshot.names)}")
    if snapshot._handed_out:  # hashes checked by latest_good() still hold; tensors given out do not
        verified = set(snapshot._verified)
        snapshot._forget()
        snapshot._verified |= verified
    report = RestoreReport(snapshot.info)
    try:
        items = _plan(snapshot, names, objects, namespace, report)
        rng_tree = snapshot.manifest["rng"] if rng else None
        for item in items:
            shape = snapshot._decode(item.tree)
            if item.kind != "value":
                _check_fits(item, snapshot.tree(item.name)["type"], shape)
        if rng_tree is not None:
            snapshot._decode(rng_tree)
        placement = _place(snapshot, items)
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
          namespace: MutableMapping[str, Any] | None, report: RestoreReport) -> list[_Item]:
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
            items.append(_Item(name, kind, None, entry["tree"]))
            continue
        live = objects.get(name) if not from_namespace else namespace.get(name) if namespace is not None else None
        if live is None:
            report.missing.append(name)
            continue
        items.append(_Item(name, "generator" if kind == "generator" else "stateful", live, entry["tree"]))
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


def _check_fits(item: _Item, saved_type: str, state: Any) -> None:
    name, live = item.name, item.live
    if item.kind == "generator":
        if not isinstance(live, torch.Generator):
            raise RestoreError(f"{name} is a {_describe(live)} in your session but a torch.Generator in the snapshot")
        if not isinstance(state.get("state") if isinstance(state, dict) else None, Placeholder):
            raise CorruptSnapshotError(f"the saved state of {name} is not a generator state")
        return
    if kind_of(live) != "stateful":
        raise RestoreError(f"{name} in your session is a {_describe(live)} without load_state_dict(); "
                           f"the snapshot holds a {saved_type.rsplit('.', 1)[-1]}")
    if isinstance(live, torch.nn.Module):
        _check_module(item, state)
    elif isinstance(live, torch.optim.Optimizer):
        _check_optimizer(item, state, saved_type)
    elif type_name(live) != saved_type and type(live).__name__ != saved_type.rsplit(".", 1)[-1]:
        raise RestoreError(f"{name} is a {_describe(live)} in your session but a {saved_type.rsplit('.', 1)[-1]} in the "
                           "snapshot: create the same kind of object, then restore")


def _describe(live: Any) -> str:
    return type(live).__name__


def _dtype_refusal(what: str, saved: torch.dtype, live: torch.dtype, where: str) -> RestoreError:
    return RestoreError(f"{what} is {saved} in the snapshot but {live} in {where}; nbguard does not convert values "
                        f"silently: make it {saved} first (e.g. model.to({saved})), or load the values yourself with "
                        "snapshot.state_dict(name) and load_state_dict, which converts")


def _check_module(item: _Item, state: Any) -> None:
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


def _check_optimizer(item: _Item, state: Any, saved_type: str) -> None:
    name, optimizer = item.name, item.live
    if type_name(optimizer) != saved_type:
        raise RestoreError(f"{name} is a {_describe(optimizer)} in your session but a {saved_type.rsplit('.', 1)[-1]} in "
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


def _place(snapshot: Snapshot, items: list[_Item]) -> _Placement:
    """Which storages go straight into live memory (``direct``: contiguous CPU tensors), which are
    read into fresh memory and swapped in (``swap``: GPU or strided tensors), and the rest."""
    where: dict[str, tuple[torch.Tensor, str]] = {}
    for item in items:
        for key in item.in_place:
            where[key] = (item.pairs[key], item.name)
    users: dict[str, list[str]] = {}
    for key, spec in snapshot.manifest["tensors"].items():
        users.setdefault(spec["storage"], []).append(key)
    placement, taken = _Placement(), set()
    for storage in dict.fromkeys(snapshot.manifest["tensors"][k]["storage"] for k in where):
        keys = users[storage]
        if not all(k in where for k in keys):
            continue  # shared with something restored another way (or not at all)
        first, owner = where[keys[0]]
        specs = [snapshot.manifest["tensors"][k] for k in keys]
        same = all(_same_region(where[k][0], first) and s["byte_offset"] == specs[0]["byte_offset"]
                   and s["stride"] == specs[0]["stride"] for k, s in zip(keys, specs, strict=True))
        region = (first.device, first.data_ptr())
        if not same or not first.numel() or region in taken:
            continue
        taken.add(region)
        nbytes = snapshot.manifest["storages"][storage]["nbytes"]
        plain = first.is_contiguous() and snapshot.placeholder(keys[0]).is_contiguous() and \
            first.numel() * first.element_size() == nbytes
        if plain and first.device.type == "cpu":
            placement.direct[storage] = (first, owner)
        else:
            placement.swap[storage] = (keys[0], first, owner)
        for k in keys:
            placement.sources[k] = where[k][0]
    return placement


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


def _check_bytes(snapshot: Snapshot, items: list[_Item], placement: _Placement, rng_tree: Any,
                 progress: ProgressFn | None) -> Callable[[int], None] | None:
    """Every byte checked before anything changes: in-place storages hashed (kept in the page
    cache only), the others read into fresh memory."""
    from .codec import tensor_refs

    refs = [ref for item in items for ref in tensor_refs(item.tree)]
    if rng_tree is not None:
        refs += tensor_refs(rng_tree)
    fresh = [k for k in dict.fromkeys(snapshot._spec(r)["storage"] for r in refs) if k not in placement.direct]
    sizes = snapshot.manifest["storages"]
    total = 2 * sum(sizes[k]["nbytes"] for k in placement.direct) + sum(sizes[k]["nbytes"] for k in fresh)
    advance = _progress(total, progress)
    for key in placement.direct:
        snapshot.check(key, advance)
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
def _apply_all(snapshot: Snapshot, items: list[_Item], states: list[Any], placement: _Placement,
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
    done: set[str] = set()
    try:
        for storage, (target, owner) in placement.direct.items():
            done.add(owner)
            snapshot.read_into(storage, target, advance)
    except BaseException as exc:
        failed = _undo(undo)
        message = (f"{exc} (while reading the snapshot into the memory of {', '.join(sorted(done))}, after every check "
                   f"had passed: the file changed or the disk failed). {', '.join(sorted(done))} "
                   f"{'is' if len(done) == 1 else 'are'} partly restored, everything else is as it was{failed}: "
                   "restore again, or from an earlier snapshot")
        if isinstance(exc, NbguardError):
            raise type(exc)(message) from exc
        raise RestoreError(message) from exc


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


def _apply(item: _Item, state: Any, placement: _Placement, snapshot: Snapshot,
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
    undo.append(lambda: live.load_state_dict(before))
    if isinstance(live, torch.nn.Module):
        # tensors load_state_dict will copy into (not placed): keep their bytes
        kept = [(t, t.clone()) for k, t in item.pairs.items() if k not in placement.sources]
        undo.append(lambda: _put_back(kept))
    for key, target, owner in placement.swap.values():
        if owner == name:
            fresh = snapshot._tensor(key)
            undo.append(lambda target=target, fresh=fresh: _swap(target, fresh))
            _swap(target, fresh)  # the fresh memory now holds the displaced bytes
    live.load_state_dict(state)
    report.restored.append((name, _describe(live)))


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
