"""Reading a snapshot back, and restoring it into live objects.

Restoring validates everything first — every byte's hash, every name, shape, dtype and type —
and only then applies, so a failed restore leaves the live objects untouched. Each stored entry is
read once, straight into fresh memory of its own (direct I/O where the store is a local folder) and
hashed as it arrives; the restored tensors are views on that memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import rng as rng_streams
from .blobfile import (
    BlobHeader,
    blob_path,
    check_entry,
    dtype_from_name,
    open_reader,
    read_entry,
    read_header,
)
from .capture import kind_of, type_name
from .codec import decode, tensor_refs
from .errors import CorruptSnapshotError, RestoreError, UsageError
from .humanize import size as human_size
from .manifest import SnapshotInfo, info_from
from .store import Store

ProgressFn = Callable[[int, int], None]


@dataclass
class RestoreReport:
    """What a restore did: each object, each RNG stream, the loop position, and what was missing."""

    snapshot: SnapshotInfo
    restored: list[tuple[str, str]] = field(default_factory=list)  # (name, what it is)
    values: dict[str, Any] = field(default_factory=dict)
    rng: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def position(self) -> Any:
        return self.snapshot.position

    def describe(self) -> str:
        """A short plain-words report."""
        lines = []
        what = ", ".join(f"{name} ({kind})" for name, kind in self.restored) or "nothing"
        lines.append(f"restored {what}")
        if self.rng:
            lines.append(f"random number generators: {', '.join(self.rng)}")
        if self.snapshot.label:
            lines.append(f"loop position: {self.snapshot.label}")
        if self.missing:
            lines.append(f"not found in your session (run the cell that creates them first): {', '.join(self.missing)}")
        lines.extend(self.notes)
        return "; ".join(lines)


class Snapshot:
    """One snapshot in a store: its manifest, and lazy, verified access to its tensors."""

    def __init__(self, store: Store, manifest: dict[str, Any], *, pinned: bool = False, state: str = "local"):
        self.store = store
        self.manifest = manifest
        self.info = info_from(manifest, pinned=pinned, state=state)
        self._blobs: dict[str, tuple[Any, BlobHeader]] = {}
        self._storages: dict[str, torch.Tensor] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._handed_out = False  # whether tensors of the caches were given out (state_dict, tensor)

    def __repr__(self) -> str:
        return f"<Snapshot {self.info.id} run={self.info.run!r} {self.info.label or ''} {human_size(self.info.size)}>"

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def metrics(self) -> dict[str, float]:
        return self.info.metrics

    @property
    def position(self) -> Any:
        return self.info.position

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.manifest["objects"])

    # -- reading ----------------------------------------------------------------------------
    def _blob(self, name: str) -> tuple[Any, BlobHeader]:
        if name not in self._blobs:
            reader = open_reader(self.store, blob_path(name))
            try:
                self._blobs[name] = (reader, read_header(reader, expected_name=name))
            except BaseException:
                reader.close()
                raise
        return self._blobs[name]

    def _entry(self, key: str) -> tuple[Any, BlobHeader, str]:
        """(reader, blob header, entry name) of the stored bytes of one storage."""
        spec = self.manifest["storages"][key]
        reader, header = self._blob(spec["blob"])
        entry = header.entries.get(spec["entry"])
        if entry is None or entry.nbytes != spec["nbytes"] or entry.hash != spec["hash"]:
            raise CorruptSnapshotError(f"snapshot {self.id}: blob {spec['blob'][:12]}… lacks entry {spec['entry']!r}")
        return reader, header, spec["entry"]

    def storage(self, key: str, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """The verified bytes of one storage, as a uint8 tensor in memory of its own."""
        if key not in self._storages:
            self._storages[key] = read_entry(*self._entry(key), progress)
        return self._storages[key]

    def tensor(self, key: str) -> torch.Tensor:
        """A tensor of the snapshot, with its dtype, shape and strides; tensors that shared
        memory when saved share it again."""
        self._handed_out = True
        return self._tensor(key)

    def _tensor(self, key: str) -> torch.Tensor:
        if key not in self._tensors:
            spec = self.manifest["tensors"].get(key)
            if spec is None:
                raise CorruptSnapshotError(f"snapshot {self.id} refers to a missing tensor {key!r}")
            self._tensors[key] = self._view(key, spec)
        return self._tensors[key]

    def _view(self, key: str, spec: dict[str, Any]) -> torch.Tensor:
        dtype = dtype_from_name(spec["dtype"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        shape, stride, offset = spec["shape"], spec["stride"], spec["byte_offset"]
        data = self.storage(spec["storage"])
        numel = math.prod(shape)
        if math.prod(d for d in shape if d) >= 2**62:
            raise CorruptSnapshotError(f"snapshot {self.id}: tensor {key!r} has an absurd shape {shape}")
        reach = 0 if numel == 0 else sum((d - 1) * s for d, s in zip(shape, stride, strict=True)) + 1
        needed = reach * itemsize
        if offset + needed > data.numel():
            raise CorruptSnapshotError(f"snapshot {self.id}: tensor {key!r} reaches past its stored bytes")
        raw = data[offset: offset + needed]
        if (raw.data_ptr() % itemsize) if needed else False:
            raw = raw.clone()
        typed = raw.view(dtype) if needed else torch.empty(0, dtype=dtype)
        return typed.as_strided(shape, stride, typed.storage_offset()) if needed else torch.empty(shape, dtype=dtype)

    def _decode(self, tree: Any) -> Any:
        return decode(tree, self._tensor)

    def tree(self, name: str) -> dict[str, Any]:
        obj = self.manifest["objects"].get(name)
        if obj is None:
            raise KeyError(f"snapshot {self.id} holds no {name!r}; it holds {', '.join(self.names)}")
        return obj

    def state_dict(self, name: str) -> Any:
        """The saved state_dict of an object (or the saved value of a plain variable)."""
        self._handed_out = True
        try:
            return self._decode(self.tree(name)["tree"])
        finally:
            self._close_readers()

    value = state_dict

    def verify(self, progress: ProgressFn | None = None) -> None:
        """Check every byte of the snapshot against its hash; CorruptSnapshotError if any fails.
        Reads through one small reused buffer: nothing is kept in memory."""
        try:
            keys = list(self.manifest["storages"])
            total = sum(self.manifest["storages"][k]["nbytes"] for k in keys)
            done = 0
            for key in keys:
                check_entry(*self._entry(key))
                done += self.manifest["storages"][key]["nbytes"]
                if progress:
                    progress(done, total)
        finally:
            self._forget()

    def _load(self, storage_keys: Iterable[str], progress: ProgressFn | None) -> None:
        keys = list(dict.fromkeys(storage_keys))
        total = sum(self.manifest["storages"][k]["nbytes"] for k in keys)
        done = 0
        try:
            for key in keys:
                self.storage(key)
                done += self.manifest["storages"][key]["nbytes"]
                if progress:
                    progress(done, total)
        finally:
            self._close_readers()

    def storage_keys_of(self, names: Iterable[str]) -> list[str]:
        keys = []
        for name in names:
            for ref in tensor_refs(self.tree(name)["tree"]):
                spec = self.manifest["tensors"].get(ref)
                if spec is None:
                    raise CorruptSnapshotError(f"snapshot {self.id} refers to a missing tensor {ref!r}")
                keys.append(spec["storage"])
        return keys

    # -- restoring --------------------------------------------------------------------------
    def restore(
        self,
        objects: Mapping[str, Any] | None = None,
        *,
        namespace: MutableMapping[str, Any] | None = None,
        only: Iterable[str] | None = None,
        rng: bool = True,
        progress: ProgressFn | None = None,
    ) -> RestoreReport:
        """Restore into live objects (looked up in ``objects``, then ``namespace``).

        Plain values are assigned into ``namespace`` when given, and returned in the report's
        ``values`` either way. RNG states are applied last. Nothing is changed unless everything
        validates.
        """
        objects = dict(objects or {})
        names = list(only) if only is not None else list(self.manifest["objects"])
        unknown = [n for n in names if n not in self.manifest["objects"]]
        if unknown:
            raise UsageError(f"snapshot {self.id} holds no {', '.join(map(repr, unknown))}; it holds {', '.join(self.names)}")
        if self._handed_out:  # bytes checked by latest_good() are kept; tensors given to the caller are not
            self._forget()
        report = RestoreReport(self.info)
        plan: list[tuple[str, str, Any, Any]] = []  # (name, kind, live object, decoded state)
        self._load(self.storage_keys_of(names) + self._rng_storage_keys(rng), progress)
        for name in names:
            entry = self.tree(name)
            kind = entry["kind"]
            if kind == "value":
                plan.append((name, kind, None, self._decode(entry["tree"])))
                continue
            live = objects.get(name, namespace.get(name) if namespace is not None else None)
            if live is None:
                report.missing.append(name)
                continue
            state = self._decode(entry["tree"])
            _check_fits(name, entry, live, state)
            plan.append((name, kind, live, state))
        rng_state = self._decode(self.manifest["rng"]) if rng and self.manifest["rng"] is not None else None
        if rng_state is not None:
            rng_streams.check(rng_state)
        for name, kind, live, state in plan:
            _apply(name, kind, live, state, namespace, report)
        if rng_state:
            report.rng = rng_streams.restore(rng_state)
        self._forget()  # the live objects own these tensors now: read the bytes afresh next time
        return report

    def _close_readers(self) -> None:
        for reader, _ in self._blobs.values():
            reader.close()
        self._blobs.clear()

    def _forget(self) -> None:
        self._handed_out = False
        self._close_readers()
        self._storages.clear()
        self._tensors.clear()

    def _rng_storage_keys(self, rng: bool) -> list[str]:
        if not rng or self.manifest["rng"] is None:
            return []
        return [self.manifest["tensors"][ref]["storage"] for ref in tensor_refs(self.manifest["rng"])
                if ref in self.manifest["tensors"]]


def _describe(live: Any) -> str:
    return type(live).__name__


def _check_fits(name: str, entry: dict[str, Any], live: Any, state: Any) -> None:
    saved_type = entry["type"]
    if entry["kind"] == "generator":
        if not isinstance(live, torch.Generator):
            raise RestoreError(f"{name} is a {_describe(live)} in your session but a torch.Generator in the snapshot")
        saved = state.get("state") if isinstance(state, dict) else None
        if not isinstance(saved, torch.Tensor):
            raise CorruptSnapshotError(f"the saved state of {name} is not a generator state")
        try:
            torch.Generator(device=live.device).set_state(saved.to("cpu", torch.uint8).contiguous())
        except (RuntimeError, TypeError, ValueError) as exc:
            raise CorruptSnapshotError(f"the saved state of {name} does not fit a {live.device} generator: {exc}") from exc
        return
    if kind_of(live) != "stateful":
        raise RestoreError(f"{name} in your session is a {_describe(live)} without load_state_dict(); "
                           f"the snapshot holds a {saved_type.rsplit('.', 1)[-1]}")
    if isinstance(live, torch.nn.Module):
        _check_module(name, live, state)
    elif isinstance(live, torch.optim.Optimizer):
        _check_optimizer(name, live, state, saved_type)
    elif type_name(live) != saved_type and type(live).__name__ != saved_type.rsplit(".", 1)[-1]:
        raise RestoreError(f"{name} is a {_describe(live)} in your session but a {saved_type.rsplit('.', 1)[-1]} in the "
                           "snapshot: create the same kind of object, then restore")


def _check_module(name: str, module: torch.nn.Module, state: Any) -> None:
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
    for key, tensor in live.items():
        saved = state[key]
        if isinstance(tensor, torch.Tensor) and not isinstance(saved, torch.Tensor):
            raise CorruptSnapshotError(f"the saved {name}.{key} is not a tensor")
        if isinstance(tensor, torch.Tensor) and isinstance(saved, torch.Tensor) and tensor.shape != saved.shape:
            raise RestoreError(f"{name}.{key} has shape {list(saved.shape)} in the snapshot but {list(tensor.shape)} in "
                               "your model: build the model with the same sizes as when the snapshot was taken")


def _check_optimizer(name: str, optimizer: torch.optim.Optimizer, state: Any, saved_type: str) -> None:
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
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise RestoreError(f"{name}: the saved {key} of parameter {pid} has shape {list(value.shape)} but the "
                                   f"parameter has {list(param.shape)}: create it over the same model parameters")


def _apply(name: str, kind: str, live: Any, state: Any, namespace: MutableMapping[str, Any] | None,
           report: RestoreReport) -> None:
    if kind == "value":
        current = namespace.get(name) if namespace is not None else None
        state = _to_device_like(state, current)
        report.values[name] = state
        if namespace is not None:
            namespace[name] = state
        report.restored.append((name, type(state).__name__))
        return
    if kind == "generator":
        live.set_state(state["state"].to("cpu", torch.uint8).contiguous())
        report.restored.append((name, "torch.Generator"))
        return
    live.load_state_dict(state)
    report.restored.append((name, _describe(live)))


def _to_device_like(value: Any, current: Any) -> Any:
    """A restored tensor goes where the live one of the same name is (a GPU snapshot restores on a
    CPU-only machine, and back)."""
    if isinstance(value, torch.Tensor):
        if isinstance(current, torch.Tensor):
            return value.to(current.device)
        return value
    return value
