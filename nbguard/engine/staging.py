"""Staging: the short part of a save that blocks the caller.

Tensors are grouped by the storage they live in (tied weights and views are stored once and
shared again after restore). Changed groups are copied into buffers that are kept and reused
between saves (fresh memory costs page faults: ~2 GiB/s against ~13 GiB/s).

Which groups are unchanged is decided soundly, not from torch's version counter alone: native
kernels write some tensors without bumping it (BatchNorm's running statistics in train mode), and so
do ``.data``, NumPy, DLPack, raw pointers and C extensions. A group whose storage, span, layout and
version counters match the last committed snapshot is therefore only a *candidate*:

- a CPU group torch allocated is not copied; the writer hashes its live bytes before the manifest
  is committed (``verify_reused``) and a mismatch makes the snapshot be retaken (the group is then
  copied at every save until a save finds it unchanged again);
- module buffers, groups once caught changing behind the counter, CUDA memory and memory torch does
  not own (``torch.from_numpy``) are copied, and the writer reuses the stored entry when the copy
  hashes the same (nothing is written).

A snapshot therefore holds the bytes each tensor had at the safe point, whatever wrote them, except
when a tensor is changed and then changed back to exactly its previously saved bytes between the two
moments (the safe point and the writer's check); the README states this limit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from ..format.blobfile import DTYPE_CODES, Item, hash_bytes, torch_dtype_name
from ..stores.directio import byte_view, populate

_TensorBase = torch._C.TensorBase


@dataclass(frozen=True)
class StoredEntry:
    """Where a group's bytes live in the store."""

    blob: str
    entry: str
    code: str
    shape: tuple[int, ...]
    nbytes: int
    hash: str


@dataclass
class Group:
    """The tensors sharing one storage, and the byte span of it that they cover."""

    key: str  # the first member's tensor key: stable between saves
    device: torch.device
    storage_key: tuple  # (device, address) of the storage: what the escape log knows it by
    resizable: bool  # False for memory torch does not own (torch.from_numpy): never trusted unchanged
    begin: int
    end: int
    members: list[tuple[str, torch.Tensor]]
    member_ids: list[tuple] = field(default_factory=list)  # each member's (key, dtype, shape, stride, offset)
    identity: tuple = ()
    versions: tuple[int, ...] = ()
    reuse: StoredEntry | None = None
    verify: bool = False  # reused unseen: the writer checks the live bytes before the commit
    suspect: bool = False  # same tensors and versions as last time, copied because counters can't vouch
    buffer: torch.Tensor | None = None  # uint8 copy of the span (or a live view when streaming)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def simple(self) -> bool:
        """One contiguous tensor filling its span: stored with its own dtype and shape."""
        if len(self.members) != 1:
            return False
        tensor = self.members[0][1]
        return tensor.is_contiguous() and tensor.dtype in DTYPE_CODES and tensor.numel() * tensor.element_size() == self.nbytes

    def entry_layout(self) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype code, shape) this group is written with."""
        if self.simple:
            tensor = self.members[0][1]
            return DTYPE_CODES[tensor.dtype], tuple(tensor.shape)
        return "U8", (self.nbytes,)

    def staged_view(self) -> memoryview:
        """The staged bytes of a group that ``stage`` copied (or streams from its live storage)."""
        if not self.nbytes:
            return memoryview(b"")
        if self.buffer is None:
            raise RuntimeError(f"group {self.key!r} was not staged")
        return _bytes_of(self.buffer)


@dataclass
class StagedSnapshot:
    """The result of staging: groups to write (with buffers) and groups to reuse."""

    groups: list[Group]
    streaming: bool = False
    staged_bytes: int = 0
    reused_bytes: int = 0
    layouts: dict[str, dict] = field(default_factory=dict)  # tensor key -> manifest entry


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    size = tensor.element_size()
    start = int(tensor.storage_offset()) * size
    if tensor.numel() == 0:
        return start, start
    reach = sum((dim - 1) * stride for dim, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return start, start + (reach + 1) * size


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without a copy (and without ``.numpy()``, which would mark a live
    storage as NumPy's for good: a restore then never exchanges its memory)."""
    return byte_view(tensor)


def group_tensors(tensors: dict[str, torch.Tensor], seen: dict[str, tuple] | None = None) -> list[Group]:
    """Group tensors by storage; the span covers every member. ``seen`` memoises what each tensor
    looked like at the last save, so unchanged tensors cost a few attribute reads (frozen layers)."""
    groups: dict[tuple, Group] = {}
    for key, tensor in tensors.items():
        skey, begin, end, member, resizable = _describe(key, tensor, seen)
        group = groups.get(skey)
        if group is None:
            groups[skey] = Group(key, tensor.device, skey, resizable, begin, end, [(key, tensor)], [member])
        else:
            group.begin, group.end = min(group.begin, begin), max(group.end, end)
            group.members.append((key, tensor))
            group.member_ids.append(member)
    return list(groups.values())


def _describe(key: str, tensor: torch.Tensor, seen: dict[str, tuple] | None) -> tuple:
    # The storage's address, the span and the layout follow from these (the address of the data,
    # its offset, shape, stride, dtype, device), whatever the tensor's contents do. (state_dict()
    # hands out a new detached tensor object at every call: the object itself cannot be the key.)
    sig = (tensor.data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device)
    if seen is not None:
        hit = seen.get(key)
        if hit is not None and hit[0] == sig:
            return hit[1]
    storage = tensor.untyped_storage()
    address = storage.data_ptr()
    skey = (str(tensor.device), address) if address else (key, id(tensor))
    begin, end = _span(tensor)
    member = (key, tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.storage_offset())
    described = (skey, begin, end, member, storage.resizable())
    if seen is not None:
        seen[key] = (sig, described)
    return described


def _identify(group: Group) -> None:
    group.identity = (group.storage_key, group.begin, group.end, tuple(group.member_ids))
    group.versions = tuple(t._version for _, t in group.members)


def _layout(group: Group, key: str, tensor: torch.Tensor) -> dict:
    return {
        "storage": group.key,
        "dtype": torch_dtype_name(tensor.dtype),
        "shape": list(tensor.shape),
        "stride": list(tensor.stride()),
        "byte_offset": tensor.storage_offset() * tensor.element_size() - group.begin,
        "device": str(tensor.device),
        "requires_grad": bool(tensor.requires_grad),
    }


def _live_view(group: Group) -> torch.Tensor:
    """The group's span of its live storage, as bytes."""
    view = torch.empty(0, dtype=torch.uint8, device=group.device)
    # torch's stubs omit the (storage, offset, size) overload that set_ has always accepted.
    return view.set_(group.members[0][1].untyped_storage(), group.begin, (group.nbytes,))  # type: ignore[call-overload]


def live_hash(group: Group) -> str:
    """Hash of the group's live bytes, as its stored entry would have it (CUDA memory is copied)."""
    if not group.nbytes:
        return hash_bytes(b"")
    view = _live_view(group)
    if view.device.type != "cpu":
        view = view.cpu()
    return hash_bytes(_bytes_of(view))


def available_memory() -> int | None:
    """Bytes of RAM the kernel says are available, or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class StagingArea:
    """Reused copy buffers plus the record of what the last committed snapshot holds."""

    def __init__(self, *, track_changes: bool = True, memory_margin: float = 0.1):
        self.track_changes = track_changes
        self.memory_margin = memory_margin
        self._buffers: dict[str, torch.Tensor] = {}
        self._seen: dict[str, tuple] = {}  # tensor key -> (signature, description): see _describe
        self._layouts: dict[str, tuple] = {}  # tensor key -> (what it depends on, manifest entry)
        self._committed: dict[str, tuple[tuple, tuple[int, ...], StoredEntry]] = {}
        self._flagged: set[str] = set()  # groups caught changing behind their version counters
        self._prefault: threading.Thread | None = None
        self._register = threading.Lock()  # a buffer is made ready by the prefault thread or claimed by a restore

    def _unchanged(self, group: Group, volatile: frozenset | set = frozenset()) -> StoredEntry | None:
        """The stored entry a group may reuse, or None to copy it (see the module docstring)."""
        previous = self._committed.get(group.key)
        if previous is None or previous[0] != group.identity or previous[1] != group.versions:
            return None
        trusted = (self.track_changes and group.resizable and group.device.type == "cpu"
                   and group.key not in self._flagged and group.storage_key not in volatile)
        if trusted:
            group.verify = True
            return previous[2]
        group.suspect = True  # copied, then hashed by the writer: maybe not written at all
        return None

    def would_copy(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether any of these tensors differs from the last committed snapshot (by content for
        those whose identity and counters match; nothing is staged)."""
        for group in group_tensors(tensors, self._seen):
            _identify(group)
            previous = self._committed.get(group.key)
            if previous is None or previous[0] != group.identity or previous[1] != group.versions:
                return True
            if live_hash(group) != previous[2].hash:
                return True
        return False

    def prefault(self, tensors: dict[str, torch.Tensor]) -> None:
        """Allocate and touch the staging buffers these tensors will need, on a background thread, so
        that the first save copies into warm memory (fresh memory costs page faults: the first save
        of a session used to stall ~2x a steady one). Returns at once: a prefault still running is
        followed, not waited for. The next ``stage`` waits for both to finish."""
        groups = group_tensors(tensors)  # not the shared memo: this runs beside training
        wanted = [(g.key, g.nbytes, g.device.type == "cuda") for g in groups if g.nbytes]
        if not wanted or not self._room_for(groups):
            return
        previous = self._prefault

        def touch() -> None:
            if previous is not None:
                previous.join()  # one prefault at a time; what it made ready is not made twice
            for key, nbytes, pin in wanted:
                buffer = self._ready(key, nbytes)
                if buffer is None:
                    buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
                    buffer.zero_()  # faults every page in now (torch releases the GIL while it runs)
                    with self._register:
                        if self._ready(key, nbytes) is None:  # else a restore claimed it meanwhile: keep that
                            self._buffers[key] = buffer
                elif not pin:
                    # A restore may have exchanged in memory nothing ever touched (a model made with
                    # torch.empty or to_empty): its pages are faulted in here, not in the next save.
                    populate(buffer)

        self._prefault = threading.Thread(target=touch, name="nbguard-prefault", daemon=True)
        self._prefault.start()

    def warm_buffer(self, key: str, nbytes: int) -> torch.Tensor | None:
        """Group ``key``'s staging buffer if it is ready (faulted in), in pageable CPU memory of exactly
        ``nbytes``: memory a restore may read into and then exchange with a live storage's (see
        ``restoring``), after which the buffer holds the displaced bytes. None otherwise; never waits
        for a prefault still running (a buffer it has not finished is not listed yet)."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() != nbytes or buffer.storage_offset() or buffer.is_pinned():
            return None
        return buffer

    def claim(self, wanted: dict[str, int]) -> dict[str, torch.Tensor]:
        """Staging buffers for a restore to read into and exchange (``warm_buffer``), for groups
        (key -> nbytes): each warm one, and for the rest new pageable memory of their size, listed at
        once as theirs so that a prefault still running does not allocate them too. The read then
        faults the new pages in as it fills them: one pass over the bytes where a live storage without
        a ready buffer was read twice (hashed in the page cache, then copied), and after the exchange
        the buffer holds the displaced memory, ready for the next save. The new ones only where the
        staging memory fits (as ``prefault``); none otherwise."""
        claimed = {}
        for key, nbytes in wanted.items():
            buffer = self.warm_buffer(key, nbytes)
            if buffer is not None:
                claimed[key] = buffer
        fresh = {key: nbytes for key, nbytes in wanted.items() if self._ready(key, nbytes) is None}
        if not fresh or not self._fits(sum(fresh.values())):
            return claimed
        with self._register:
            for key, nbytes in fresh.items():
                if self._ready(key, nbytes) is None:  # one of another size is replaced, as by prefault
                    self._buffers[key] = torch.empty(nbytes, dtype=torch.uint8)
                buffer = self.warm_buffer(key, nbytes)
                if buffer is not None:
                    claimed[key] = buffer
        return claimed

    def wait_prefault(self) -> None:
        thread, self._prefault = self._prefault, None
        if thread is not None:
            thread.join()

    def stage(self, tensors: dict[str, torch.Tensor], *, volatile: frozenset | set = frozenset(),
              allow_streaming: bool = True) -> StagedSnapshot:
        """Decide per group (reuse or copy), and copy the changed ones into buffers. ``volatile``:
        storage keys whose version counters are not trusted (module buffers)."""
        self.wait_prefault()
        if len(self._seen) > 2 * len(tensors) + 64:
            self._seen = {k: v for k, v in self._seen.items() if k in tensors}
        groups = group_tensors(tensors, self._seen)
        staged = StagedSnapshot(groups)
        for group in groups:
            _identify(group)
            for (key, tensor), member in zip(group.members, group.member_ids, strict=True):
                staged.layouts[key] = self._layout(group, key, tensor, member)
            group.reuse = self._unchanged(group, volatile)
            if group.reuse is not None:
                staged.reused_bytes += group.nbytes
        changed = [g for g in groups if g.reuse is None]
        staged.streaming = allow_streaming and not self._room_for(changed)
        for group in changed:
            group.buffer = _live_view(group) if staged.streaming and group.device.type == "cpu" else self._copy(group)
            staged.staged_bytes += group.nbytes
        if any(g.device.type == "cuda" for g in changed):
            torch.cuda.synchronize()
        return staged

    def verify_reused(self, groups: list[Group]) -> list[Group]:
        """The reused groups whose live bytes no longer hash to their stored entry. Those whose
        counters did not move either were written behind them: they are copied from now on."""
        stale = []
        for group in groups:
            if group.reuse is None or not group.verify or live_hash(group) == group.reuse.hash:
                continue
            stale.append(group)
            if tuple(t._version for _, t in group.members) == group.versions:
                self._flagged.add(group.key)
        return stale

    def _layout(self, group: Group, key: str, tensor: torch.Tensor, member: tuple) -> dict:
        cache = (group.key, group.begin, member, tensor.requires_grad)
        hit = self._layouts.get(key)
        if hit is not None and hit[0] == cache:
            return hit[1]
        layout = _layout(group, key, tensor)
        self._layouts[key] = (cache, layout)
        return layout

    def _room_for(self, groups: list[Group]) -> bool:
        return self._fits(sum(g.nbytes for g in groups if g.device.type == "cpu" and self._reusable(g) is None))

    def _fits(self, needed: int) -> bool:
        """Whether ``needed`` more bytes of staging memory leave the machine its margin."""
        if needed == 0:
            return True
        free = available_memory()
        return free is None or needed <= free * (1 - self.memory_margin) - 256 * 2**20

    def _reusable(self, group: Group) -> torch.Tensor | None:
        return self._ready(group.key, group.nbytes)

    def _ready(self, key: str, nbytes: int) -> torch.Tensor | None:
        buffer = self._buffers.get(key)
        return buffer if buffer is not None and buffer.numel() == nbytes else None

    def _copy(self, group: Group) -> torch.Tensor:
        buffer = self._reusable(group)
        if buffer is None:
            pin = group.device.type == "cuda"
            buffer = torch.empty(group.nbytes, dtype=torch.uint8, pin_memory=pin)
            self._buffers[group.key] = buffer
        if group.nbytes:
            buffer.copy_(_live_view(group), non_blocking=group.device.type == "cuda")
        return buffer

    def commit(self, groups: list[Group], entries: dict[str, StoredEntry]) -> None:
        """Record what a committed snapshot holds, so the next save can skip unchanged groups."""
        for group in groups:
            previous = self._committed.get(group.key)
            if group.key in self._flagged and previous is not None and previous[2] == entries[group.key]:
                self._flagged.discard(group.key)  # found unchanged: its counters are trusted again
            self._committed[group.key] = (group.identity, group.versions, entries[group.key])

    def drop_missing(self, store) -> None:
        """Forget committed groups whose blob was deleted (by hand, the panel or another process), so
        the next snapshot never refers to a missing blob."""
        from ..format.blobfile import blob_path

        blobs = {rec[2].blob for rec in self._committed.values()}
        missing = {b for b in blobs if not store.exists(blob_path(b))}
        if missing:
            self._committed = {k: v for k, v in self._committed.items() if v[2].blob not in missing}

    def previous_entry(self, key: str) -> StoredEntry | None:
        """What the last committed snapshot stored for a group."""
        previous = self._committed.get(key)
        return previous[2] if previous else None

    def to_write(self, staged: StagedSnapshot) -> tuple[dict[str, StoredEntry], list[Item]]:
        """The stored entries that groups keep, and the blob items (key, dtype code, shape, bytes, hash
        when known) of the rest. A group copied although its counters had not moved often turns out
        unchanged: when its bytes hash to its last stored entry, that entry is kept."""
        entries: dict[str, StoredEntry] = {}
        items: list[Item] = []
        for group in staged.groups:
            if group.reuse is not None:
                entries[group.key] = group.reuse
                continue
            view = group.staged_view()
            previous = self.previous_entry(group.key)
            digest = None
            if group.suspect and previous is not None and previous.nbytes == group.nbytes:
                digest = hash_bytes(view)
                if digest == previous.hash:
                    entries[group.key] = previous
                    continue
            items.append((group.key, *group.entry_layout(), view, digest))
        return entries, items

    def forget(self, groups: list[Group]) -> None:
        """A save failed: its staged groups must be copied again next time."""
        for group in groups:
            if group.reuse is None:
                self._committed.pop(group.key, None)

    def drop_buffers(self) -> None:
        """Release the staging memory (it is allocated again by the next save)."""
        self.wait_prefault()
        self._buffers.clear()

    @property
    def buffer_bytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())

