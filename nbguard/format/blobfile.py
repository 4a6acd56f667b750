"""Blob files: safetensors-format containers of raw tensor bytes, named by their content.

A blob is a standard safetensors file (8-byte little-endian header length, a JSON header, then
the data section without holes). nbguard adds the xxh3-128 hash of every entry to the header's
``__metadata__``; the blob's name is the xxh3-128 of the header bytes, so the name covers every
entry's hash (a Merkle-style content address) and any flipped byte is found on read.

Parsing never trusts the file: sizes, offsets, dtypes, shapes and nesting are checked before any
allocation, and nothing is ever unpickled.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from ..errors import CorruptSnapshotError
from ..stores.base import OpensReaders, WritesWithHeader
from ..stores.directio import PIECE, byte_view
from .jsonsafe import no_duplicate_keys

# safetensors' dtype codes. Dtypes missing here are stored as raw bytes ("U8") and their torch
# dtype is recorded in the manifest, so every dtype round-trips.
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.complex64: "C64",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
ITEMSIZE = {code: torch.empty((), dtype=dtype).element_size() for dtype, code in DTYPE_CODES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024
HASH_CHUNK = 64 * 1024 * 1024
# The data section starts on a 4 KiB boundary, so it can be written and read with direct I/O.
HEADER_ALIGN = 4096
BLOB_SUFFIX = ".safetensors"


def torch_dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype called ``name``; CorruptSnapshotError for anything else."""
    dtype = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        raise CorruptSnapshotError(f"unknown tensor dtype {name!r} in snapshot")
    return dtype


def hash_bytes(data: memoryview | bytes) -> str:
    """xxh3-128 of a buffer, fed in chunks so other threads get the GIL between them."""
    view = memoryview(data).cast("B")
    h = xxhash.xxh3_128()
    for start in range(0, len(view), HASH_CHUNK):
        h.update(view[start:start + HASH_CHUNK])
    return h.hexdigest()


@dataclass(frozen=True)
class Entry:
    """One named run of bytes inside a blob."""

    name: str
    code: str  # safetensors dtype code
    shape: tuple[int, ...]
    begin: int  # offset in the data section
    end: int
    hash: str

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def build_header(items: Sequence[tuple[str, str, tuple[int, ...], int, str]]) -> tuple[bytes, list[Entry]]:
    """Header bytes (length prefix included) and entries for (name, code, shape, nbytes, hash) items.

    Items are laid out by decreasing item size so every entry stays aligned for its dtype.
    """
    order = sorted(items, key=lambda item: -ITEMSIZE[item[1]])
    header: dict[str, object] = {}
    entries = []
    offset = 0
    for name, code, shape, nbytes, digest in order:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        entries.append(Entry(name, code, tuple(shape), offset, offset + nbytes, digest))
        offset += nbytes
    header["__metadata__"] = {"format": "pt", "nbguard.hashes": json.dumps({e.name: e.hash for e in entries})}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % HEADER_ALIGN)  # safetensors allows padding the header with spaces
    return struct.pack("<Q", len(text)) + text, entries


def blob_name(header: bytes) -> str:
    """The content address of a blob: the hash of its header (which lists every entry's hash)."""
    return xxhash.xxh3_128_hexdigest(header)


def blob_path(name: str) -> str:
    """Where a blob lives in a store."""
    return f"blobs/{name[:2]}/{name}{BLOB_SUFFIX}"


@dataclass(frozen=True)
class BlobHeader:
    """A parsed and validated blob header."""

    header_bytes: bytes
    data_start: int
    entries: dict[str, Entry]


def parse_header(data: memoryview | bytes, *, expected_name: str | None = None) -> BlobHeader:
    """Validate and parse a blob's header; checks the blob's name when ``expected_name`` is given."""
    view = memoryview(data).cast("B")
    return parse_header_bytes(view[:8 + _header_length(view[:8], len(view))], len(view), expected_name=expected_name)


def read_header(reader, *, expected_name: str | None = None) -> BlobHeader:
    """``parse_header`` for a blob read through a ``FileReader``-like object (reads the header only)."""
    length = _header_length(reader.pread(0, 8), reader.size)
    header_bytes = reader.pread(0, 8 + length)
    if len(header_bytes) != 8 + length:
        raise CorruptSnapshotError("blob header is truncated")
    return parse_header_bytes(header_bytes, reader.size, expected_name=expected_name)


class BufferReader:
    """``FileReader``'s reading methods over a blob already in memory (stores without ``open_reader``)."""

    def __init__(self, data: memoryview | bytes):
        self._view = memoryview(data).cast("B")
        self.size = len(self._view)

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self._view[offset:offset + length])

    def _range(self, offset: int, nbytes: int) -> memoryview:
        raw = self._view[offset:offset + nbytes]
        if len(raw) != nbytes:
            raise CorruptSnapshotError("blob is truncated (shorter than its header says)")
        return raw

    def read_entry(self, offset: int, nbytes: int, hasher, progress=None) -> torch.Tensor:
        out = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self.read_into(byte_view(out), offset, hasher, progress)
        return out

    def read_into(self, view: memoryview, offset: int, hasher, progress=None) -> None:
        nbytes = len(view)
        raw = self._range(offset, nbytes)
        for start in range(0, nbytes, HASH_CHUNK):
            piece = raw[start:start + HASH_CHUNK]
            view[start:start + len(piece)] = piece
            hasher.update(piece)
            if progress:
                progress(len(piece))

    def hash_range(self, offset: int, nbytes: int, hasher, progress=None) -> None:
        raw = self._range(offset, nbytes)
        for start in range(0, nbytes, HASH_CHUNK):
            hasher.update(raw[start:start + HASH_CHUNK])
            if progress:
                progress(len(raw[start:start + HASH_CHUNK]))

    def close(self) -> None:
        self._view = memoryview(b"")


def open_reader(store, path: str):
    """A reader for one blob: positional file reads where the store offers them, else its bytes."""
    return store.open_reader(path) if isinstance(store, OpensReaders) else BufferReader(store.open_blob(path))


def _header_length(prefix: memoryview | bytes, file_size: int) -> int:
    if len(prefix) < 8:
        raise CorruptSnapshotError("blob is truncated (shorter than its header length field)")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES or 8 + length > file_size:
        raise CorruptSnapshotError("blob header is truncated or declares an absurd size")
    return length


def parse_header_bytes(header_bytes: memoryview | bytes, file_size: int, *,
                       expected_name: str | None = None) -> BlobHeader:
    """Validate and parse a blob's header (length field included) for a file of ``file_size`` bytes."""
    header_bytes = bytes(header_bytes)
    length = len(header_bytes) - 8
    if expected_name is not None and blob_name(header_bytes) != expected_name:
        raise CorruptSnapshotError(f"blob {expected_name[:12]}… does not match its name (damaged header)")
    try:
        header = json.loads(header_bytes[8:], object_pairs_hook=no_duplicate_keys("a blob header"))
    except (ValueError, RecursionError) as exc:
        raise CorruptSnapshotError(f"blob header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CorruptSnapshotError("blob header is not a JSON object")
    meta = header.pop("__metadata__", {})
    try:
        hashes = json.loads(meta["nbguard.hashes"]) if isinstance(meta, dict) else None
    except (KeyError, TypeError, ValueError, RecursionError):
        hashes = None
    if not isinstance(hashes, dict):
        raise CorruptSnapshotError("blob header has no nbguard hashes (not an nbguard blob)")
    data_len = file_size - 8 - length
    entries: dict[str, Entry] = {}
    spans = []
    for name, spec in header.items():
        entries[name] = entry = _parse_entry(name, spec, hashes.get(name), data_len)
        spans.append((entry.begin, entry.end))
    spans.sort()
    cursor = 0
    for begin, end in spans:
        if begin != cursor:
            raise CorruptSnapshotError("blob data has holes or overlapping entries")
        cursor = end
    if cursor != data_len:
        raise CorruptSnapshotError("blob is truncated or has trailing bytes")
    return BlobHeader(header_bytes, 8 + length, entries)


def _parse_entry(name: str, spec: object, digest: object, data_len: int) -> Entry:
    if not isinstance(spec, dict) or not isinstance(digest, str):
        raise CorruptSnapshotError(f"blob entry {name!r} is malformed")
    code, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(code, str) or code not in ITEMSIZE:
        raise CorruptSnapshotError(f"blob entry {name!r} has unknown dtype {code!r}")
    if not (isinstance(shape, list) and len(shape) <= 64 and all(type(d) is int and d >= 0 for d in shape)):
        raise CorruptSnapshotError(f"blob entry {name!r} has an invalid shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CorruptSnapshotError(f"blob entry {name!r} has invalid offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len or math.prod(shape) * ITEMSIZE[code] != end - begin:
        raise CorruptSnapshotError(f"blob entry {name!r} declares a size that does not match the file")
    return Entry(name, code, tuple(shape), begin, end, digest)


def read_entry(reader, header: BlobHeader, name: str, progress=None) -> torch.Tensor:
    """The bytes of one entry, read through ``reader`` (a ``FileReader`` or ``BufferReader``) into
    fresh memory of their own and checked against their hash as they arrive."""
    entry = header.entries[name]
    hasher = xxhash.xxh3_128()
    out = reader.read_entry(header.data_start + entry.begin, entry.nbytes, hasher, progress)
    _check_hash(hasher, entry)
    return out


def read_entry_into(reader, header: BlobHeader, name: str, view: memoryview, progress=None) -> None:
    """Read one entry's bytes into ``view`` (exactly its size: a live tensor's memory), hashing
    them as they arrive; CorruptSnapshotError, after the bytes landed, if they do not match."""
    entry = header.entries[name]
    if len(view) != entry.nbytes:
        raise ValueError(f"entry {name!r} holds {entry.nbytes} bytes, not {len(view)}")
    hasher = xxhash.xxh3_128()
    reader.read_into(view, header.data_start + entry.begin, hasher, progress)
    _check_hash(hasher, entry)


def copy_checked_into(reader, header: BlobHeader, name: str, view: memoryview, identity: tuple[int, ...],
                      progress=None) -> None:
    """``read_entry_into`` for an entry already hashed (``entry_check``) through a file whose
    ``identity()`` was ``identity`` before that hash: the bytes are copied from the page cache alone
    (``FileReader.copy_cached``), hashed again only where some had to come from the disk, and the
    file must be the same unchanged one before and after the copy. CorruptSnapshotError otherwise
    (before any byte lands if the file was replaced or written since the check)."""
    entry = header.entries[name]
    if len(view) != entry.nbytes:
        raise ValueError(f"entry {name!r} holds {entry.nbytes} bytes, not {len(view)}")
    changed = CorruptSnapshotError(f"the blob file of entry {name!r} was replaced or written after it was checked")
    if reader.identity() != identity:
        raise changed
    if not reader.copy_cached(view, header.data_start + entry.begin, progress):
        hasher = xxhash.xxh3_128()
        for start in range(0, len(view), HASH_CHUNK):
            hasher.update(view[start:start + HASH_CHUNK])
        _check_hash(hasher, entry)
    if reader.identity() != identity:
        raise changed


def entry_check(header: BlobHeader, name: str) -> tuple[int, int, Any, Callable[[], None]]:
    """Where one entry's bytes lie in its blob (offset, length), a fresh hasher to feed them to, and
    what checks them once all were fed (CorruptSnapshotError if they do not match)."""
    entry = header.entries[name]
    hasher = xxhash.xxh3_128()
    return header.data_start + entry.begin, entry.nbytes, hasher, functools.partial(_check_hash, hasher, entry)


def _check_hash(hasher, entry: Entry) -> None:
    if hasher.hexdigest() != entry.hash:
        raise CorruptSnapshotError(f"blob entry {entry.name!r} is damaged (hash mismatch)")


def blob_chunks(header: bytes, buffers: Sequence[memoryview]) -> Iterator[memoryview]:
    """The byte chunks of a blob file in order: header, then each entry's buffer."""
    yield memoryview(header)
    yield from buffers


Item = tuple[str, str, tuple[int, ...], memoryview, "str | None"]  # name, dtype code, shape, bytes, hash if known


def write_blob(store, items: Sequence[Item],
               before_publish: Callable[[str], None] | None = None) -> tuple[str, list[Entry], int]:
    """Write one blob of ``items``; returns its name, its entries and the bytes written.
    ``before_publish(name)`` runs once the name is known, before the blob appears under it (the
    writer's lease on it must exist before anyone can see it unreferenced).

    Stores that can write a file's front last (``write_with_header``) get the data streamed: each
    16 MiB piece is hashed while it is in the CPU cache and handed to the disk, and the header (which
    lists the hashes) is written at the end. Other stores get the hashes computed first."""
    views = {name: view for name, _, _, view, _ in items}
    if not isinstance(store, WritesWithHeader) or all(digest is not None for *_, digest in items):
        header, layout = build_header([(n, c, s, v.nbytes, d or hash_bytes(v)) for n, c, s, v, d in items])
        name = blob_name(header)
        if before_publish is not None:
            before_publish(name)
        store.write(blob_path(name), blob_chunks(header, [views[e.name] for e in layout]))
        return name, layout, len(header) + sum(v.nbytes for v in views.values())
    placeholder, layout = build_header([(n, c, s, v.nbytes, "0" * 32) for n, c, s, v, _ in items])
    digests: dict[str, str] = {}

    def pieces() -> Iterator[memoryview]:
        for entry in layout:
            view = views[entry.name]
            hasher = xxhash.xxh3_128()
            for start in range(0, view.nbytes, PIECE):
                piece = view[start:start + PIECE]
                hasher.update(piece)
                yield piece
            digests[entry.name] = hasher.hexdigest()

    final: list[tuple[bytes, list[Entry]]] = []

    def finish() -> tuple[str, bytes]:
        final.append(build_header([(n, c, s, v.nbytes, digests[n]) for n, c, s, v, _ in items]))
        if before_publish is not None:
            before_publish(blob_name(final[0][0]))
        return blob_path(blob_name(final[0][0])), final[0][0]

    store.write_with_header(len(placeholder), pieces(), finish)
    header, layout = final[0]
    return blob_name(header), layout, len(header) + sum(v.nbytes for v in views.values())
