"""Reading a snapshot back: its manifest, and lazy, verified access to its tensors.

Nothing here trusts the snapshot: every tensor's layout is checked against its storage and its
blob's header before a byte is read, and every byte against its hash as it arrives. Restoring
into live objects is ``restoring.restore``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CorruptSnapshotError
from ..format.blobfile import (
    DTYPE_CODES,
    BlobHeader,
    blob_path,
    copy_checked_into,
    dtype_from_name,
    entry_check,
    open_reader,
    read_entry,
    read_entry_into,
    read_header,
)
from ..format.codec import decode, tensor_refs
from ..format.manifest import info_from
from ..humanize import size as human_size
from ..stores import Store
from ..stores.filereader import FileReader, HashRange, ReadRange, hash_ranges, read_ranges
from .fit import Placeholder
from .report import ProgressFn, RestoreReport

if TYPE_CHECKING:
    from .staging import StagingArea


class Snapshot:
    """One snapshot in a store: its manifest, and lazy, verified access to its tensors."""

    def __init__(self, store: Store, manifest: dict[str, Any], *, pinned: bool = False, state: str = "local"):
        self.store = store
        self.manifest = manifest
        self.info = info_from(manifest, pinned=pinned, state=state)
        self._blobs: dict[str, tuple[Any, BlobHeader]] = {}  # open readers
        self._headers: dict[str, BlobHeader] = {}  # parsed headers, kept when the readers close
        self._storages: dict[str, torch.Tensor] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._verified: set[str] = set()  # storage keys whose bytes matched their hash (not kept)
        self._checked_in: dict[str, tuple[int, ...]] = {}  # storage key -> identity of the file it was hashed in
        self._layout: dict[str, tuple[int, int, int, dict[str, Any]]] | None = None
        self._entries_ok: set[str] = set()  # storage keys whose blob entry was checked against the manifest
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
                known = self._headers.get(name)
                if known is None or reader.pread(0, len(known.header_bytes)) != known.header_bytes:
                    known = self._headers[name] = read_header(reader, expected_name=name)
                self._blobs[name] = (reader, known)
            except BaseException:
                reader.close()
                raise
        return self._blobs[name]

    def _entry(self, key: str) -> tuple[Any, BlobHeader, str]:
        """(reader, blob header, entry name) of the stored bytes of one storage, checked against
        the manifest and against the tensors laid on it (reads the blob's header only)."""
        spec = self.manifest["storages"][key]
        reader, header = self._blob(spec["blob"])
        entry = header.entries.get(spec["entry"])
        if entry is None or entry.nbytes != spec["nbytes"] or entry.hash != spec["hash"]:
            raise CorruptSnapshotError(f"snapshot {self.id}: blob {spec['blob'][:12]}… lacks entry {spec['entry']!r}")
        if key in self._entries_ok:
            return reader, header, spec["entry"]
        begin, end, users, first = self._storage_layout().get(key, (0, 0, 0, None))
        if entry.nbytes and (begin != 0 or end != entry.nbytes):
            # nbguard stores exactly the bytes its tensors cover: more would be read for nothing
            raise CorruptSnapshotError(f"snapshot {self.id}: storage {key!r} holds {entry.nbytes} bytes but its "
                                       f"tensors cover bytes {begin}-{end}")
        if entry.code != "U8":  # a storage of one plain tensor is stored with that tensor's dtype and shape
            dtype = _dtype_or_none(first["dtype"]) if first is not None else None
            if users != 1 or first is None or dtype is None or DTYPE_CODES.get(dtype) != entry.code \
                    or tuple(first["shape"]) != entry.shape:
                raise CorruptSnapshotError(f"snapshot {self.id}: blob entry {spec['entry']!r} is {entry.code} "
                                           f"{list(entry.shape)}, which is not the tensor the manifest lays on it")
        self._entries_ok.add(key)
        return reader, header, spec["entry"]

    def _storage_layout(self) -> dict[str, tuple[int, int, int, dict[str, Any]]]:
        """For each storage: the first and last byte its tensors reach, how many tensors use it, and
        the first one's spec (from the manifest alone)."""
        if self._layout is None:
            layout: dict[str, tuple[int, int, int, dict[str, Any]]] = {}
            for key, spec in self.manifest["tensors"].items():
                begin = spec["byte_offset"]
                end = begin + self._reach(key, spec)
                low, high, users, first = layout.get(spec["storage"], (begin, end, 0, spec))
                layout[spec["storage"]] = (min(low, begin), max(high, end), users + 1, first)
            self._layout = layout
        return self._layout

    def _reach(self, key: str, spec: dict[str, Any]) -> int:
        """Bytes from a tensor's first element to the end of its last."""
        shape, stride = spec["shape"], spec["stride"]
        if math.prod(d for d in shape if d) >= 2**62:
            raise CorruptSnapshotError(f"snapshot {self.id}: tensor {key!r} has an absurd shape {shape}")
        if not math.prod(shape):
            return 0
        itemsize = dtype_from_name(spec["dtype"]).itemsize
        return (sum((d - 1) * s for d, s in zip(shape, stride, strict=True)) + 1) * itemsize

    def storage(self, key: str, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """The verified bytes of one storage, as a uint8 tensor in memory of its own."""
        if key not in self._storages:
            self._storages[key] = read_entry(*self._entry(key), progress)
            self._verified.add(key)
        return self._storages[key]

    def read_into(self, key: str, target: torch.Tensor, progress: Callable[[int], None] | None = None) -> None:
        """Read one storage's bytes straight into ``target`` (a contiguous CPU tensor of exactly its
        size). Bytes ``check`` hashed in this very file, unchanged since, are copied from the page
        cache without hashing them again (``copy_checked_into``); any others are hashed as they
        arrive. CorruptSnapshotError (after the bytes landed) if they do not match."""
        from ..stores.directio import byte_view

        reader, header, entry = self._entry(key)
        identity = self._checked_in.get(key)
        if identity is not None and isinstance(reader, FileReader):
            copy_checked_into(reader, header, entry, byte_view(target), identity, progress)
        else:
            read_entry_into(reader, header, entry, byte_view(target), progress)

    def was_checked(self, key: str) -> bool:
        """Whether ``check`` hashed this storage's bytes in its blob file (``read_into`` then copies them
        from the page cache)."""
        return key in self._checked_in

    def read_all_into(self, targets: Mapping[str, torch.Tensor], progress: Callable[[int], None] | None = None) -> None:
        """Read several storages' bytes into memory of their own (``targets``: storage key -> contiguous
        CPU tensor of exactly its size), in the order the bytes lie on the disk, each piece hashed once
        it landed (what lands is what is checked). CorruptSnapshotError at the first that does not match."""
        from ..stores.directio import byte_view

        ranges = []
        for key, reader, offset, nbytes, hasher, verify in self._in_disk_order(targets):
            into = byte_view(targets[key])
            if len(into) != nbytes:
                raise ValueError(f"storage {key!r} holds {nbytes} bytes, not {len(into)}")
            ranges.append(ReadRange(reader, offset, into, hasher, verify))
        read_ranges(ranges, progress)

    def check(self, key: str, progress: Callable[[int], None] | None = None) -> None:
        """Check one storage's bytes against their hash, reading them into the page cache only (they
        stay there for ``read_into``)."""
        self.check_all([key], progress)

    def check_all(self, keys: Iterable[str], progress: Callable[[int], None] | None = None) -> None:
        """``check`` for several storages, read ahead across them (``hash_ranges``: the disk does not
        wait at each storage's end). Stops at the first that does not match.

        The storages are hashed in the order their bytes lie on the disk (blob by blob, front to back),
        whatever the order of ``keys``: a saver writes storages in the order they finish, not the
        order a restore names them, and hashing in the caller's order read the files out of order (a
        cold 0.75 GiB restore hashed 24 storages at 22 places, with 16 KiB reads waiting on the disk
        between the 64 MiB ones)."""
        checks = self._in_disk_order(k for k in keys if k not in self._verified)
        hash_ranges([HashRange(reader, offset, nbytes, hasher, functools.partial(self._checked, key, reader, verify))
                     for key, reader, offset, nbytes, hasher, verify in checks], progress)

    def _in_disk_order(self, keys: Iterable[str]) -> list[tuple[str, Any, int, int, Any, Callable[[], None]]]:
        """(key, reader, offset, nbytes, hasher, verify) of each storage, in the order their bytes lie
        on the disk (blob by blob, front to back)."""
        checks = []
        for key in keys:
            reader, header, entry = self._entry(key)
            checks.append((key, reader, *entry_check(header, entry)))
        return sorted(checks, key=lambda c: (self.manifest["storages"][c[0]]["blob"], c[2]))

    def _checked(self, key: str, reader: Any, verify: Callable[[], None]) -> None:
        verify()
        self._verified.add(key)
        if isinstance(reader, FileReader):
            self._checked_in[key] = reader.opened

    def ensure_unchanged(self, keys: Iterable[str]) -> None:
        """CorruptSnapshotError if a blob file that ``check`` hashed these storages in has since been
        replaced or written (its device, inode, size, mtime or ctime differ)."""
        for key in keys:
            identity = self._checked_in.get(key)
            if identity is not None and self._entry(key)[0].identity() != identity:
                raise CorruptSnapshotError(f"snapshot {self.id}: the blob file of storage {key!r} was replaced or "
                                           "written after its bytes were checked")

    def tensor(self, key: str) -> torch.Tensor:
        """A tensor of the snapshot, with its dtype, shape and strides; tensors that shared
        memory when saved share it again."""
        self._handed_out = True
        return self._tensor(key)

    def _tensor(self, key: str) -> torch.Tensor:
        if key not in self._tensors:
            spec = self._spec(key)
            self._tensors[key] = self._view(key, spec)
        return self._tensors[key]

    def _spec(self, key: str) -> dict[str, Any]:
        spec = self.manifest["tensors"].get(key)
        if spec is None:
            raise CorruptSnapshotError(f"snapshot {self.id} refers to a missing tensor {key!r}")
        return spec

    def placeholder(self, key: str) -> Placeholder:
        """A tensor's dtype, shape and place, checked against its storage and blob header, unread."""
        spec = self._spec(key)
        dtype = dtype_from_name(spec["dtype"])
        if spec["byte_offset"] + self._reach(key, spec) > self.manifest["storages"][spec["storage"]]["nbytes"]:
            raise CorruptSnapshotError(f"snapshot {self.id}: tensor {key!r} reaches past its stored bytes")
        self._entry(spec["storage"])
        return Placeholder(key, spec, dtype)

    def _view(self, key: str, spec: dict[str, Any]) -> torch.Tensor:
        dtype = dtype_from_name(spec["dtype"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        shape, stride, offset = spec["shape"], spec["stride"], spec["byte_offset"]
        needed = self._reach(key, spec)
        data = self.storage(spec["storage"])
        if offset + needed > data.numel():
            raise CorruptSnapshotError(f"snapshot {self.id}: tensor {key!r} reaches past its stored bytes")
        raw = data[offset: offset + needed]
        if (raw.data_ptr() % itemsize) if needed else False:
            raw = raw.clone()
        typed = raw.view(dtype) if needed else torch.empty(0, dtype=dtype)
        return typed.as_strided(shape, stride, typed.storage_offset()) if needed else torch.empty(shape, dtype=dtype)

    def _decode(self, tree: Any) -> Any:
        """Check a tree without reading tensor bytes: tensors (and arrays) decode to ``Placeholder``s."""
        return decode(tree, self.placeholder)

    def _materialize(self, tree: Any, source: Callable[[str], torch.Tensor] | None = None) -> Any:
        """A tree with its tensors read (verified) from the store, or taken from ``source``."""
        return decode(tree, source or self._tensor)

    def tree(self, name: str) -> dict[str, Any]:
        obj = self.manifest["objects"].get(name)
        if obj is None:
            raise KeyError(f"snapshot {self.id} holds no {name!r}; it holds {', '.join(self.names)}")
        return obj

    def state_dict(self, name: str) -> Any:
        """The saved state_dict of an object (or the saved value of a plain variable)."""
        self._handed_out = True
        try:
            self._decode(self.tree(name)["tree"])  # every layout checked before the first byte is read
            return self._materialize(self.tree(name)["tree"])
        finally:
            self._close_readers()

    value = state_dict

    def verify(self, progress: ProgressFn | None = None) -> None:
        """Check every byte of the snapshot against its hash; CorruptSnapshotError if any fails.
        Reads through one small reused buffer: nothing is kept in memory."""
        try:
            self._load(self.manifest["storages"], progress)
        finally:
            self._forget()

    def _load(self, storage_keys: Iterable[str], progress: ProgressFn | None) -> None:
        """Check the bytes of these storages against their hashes, keeping none of them (a restore
        that follows reads them again, from the page cache, into their final memory)."""
        keys = list(dict.fromkeys(storage_keys))
        total = sum(self.manifest["storages"][k]["nbytes"] for k in keys)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        try:
            for key in keys:
                self._entry(key)
            for key in keys:
                self.check(key, advance if progress else None)
        finally:
            self._close_readers()

    def storage_keys_of(self, names: Iterable[str]) -> list[str]:
        keys = []
        for name in names:
            for ref in tensor_refs(self.tree(name)["tree"]):
                keys.append(self._spec(ref)["storage"])
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
        staging: StagingArea | None = None,
    ) -> RestoreReport:
        """Restore into live objects (looked up in ``objects``, then ``namespace``), all or nothing.

        Every name, shape, dtype and hash is checked before the first live byte changes; tensors of
        models and optimizers are read straight into their own memory. If anything fails (also a
        ``load_state_dict`` that raises), every object, RNG and namespace value is as it was before.
        A dtype change is refused (nbguard never converts silently). Plain values are assigned into
        ``namespace`` when given (never over ``__builtins__``, ``__names`` or modules:
        those are skipped and listed in the report's ``notes``) and returned in ``values`` either way.
        ``staging``: a ``Guard``'s staging memory (``Guard.restore`` passes its own, with its writer
        idle): storages are read into its warm buffers, then their memory changes places with the
        live storages' (no copy, no fresh memory).
        """
        from .restoring import restore

        return restore(self, objects or {}, namespace=namespace, only=only, rng=rng, progress=progress,
                       staging=staging)

    def _close_readers(self) -> None:
        for reader, _ in self._blobs.values():
            reader.close()
        self._blobs.clear()

    def _forget(self) -> None:
        self._handed_out = False
        self._close_readers()
        self._storages.clear()
        self._tensors.clear()
        self._verified.clear()
        self._checked_in.clear()
        self._entries_ok.clear()

    def _rng_storage_keys(self, rng: bool) -> list[str]:
        if not rng or self.manifest["rng"] is None:
            return []
        return [self.manifest["tensors"][ref]["storage"] for ref in tensor_refs(self.manifest["rng"])
                if ref in self.manifest["tensors"]]


def _dtype_or_none(name: str) -> torch.dtype | None:
    try:
        return dtype_from_name(name)
    except CorruptSnapshotError:
        return None
