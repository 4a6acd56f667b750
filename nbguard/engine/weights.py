"""Weights-only files for deployment: standard safetensors, written atomically, read without pickle."""

from __future__ import annotations

import json
import os
import struct
import uuid

import torch
import xxhash

from ..errors import CorruptSnapshotError, StoreError, UsageError
from ..format.blobfile import (
    CODE_DTYPES,
    DTYPE_CODES,
    MAX_HEADER_BYTES,
    BlobHeader,
    _parse_entry,
    build_header,
    hash_bytes,
    read_header,
)
from ..stores.directio import byte_view
from ..stores.filereader import FileReader


def write_safetensors(tensors: dict[str, torch.Tensor], out: str | os.PathLike[str], metadata: dict[str, str]) -> str:
    """A standard safetensors file of contiguous CPU copies, written atomically."""
    buffers, items = {}, []
    kept: list[torch.Tensor] = []  # a byte view does not hold its tensor: the copies must outlive the write
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_CODES:
            raise UsageError(f"{name}: dtype {tensor.dtype} cannot be stored in a safetensors file")
        data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8) if tensor.numel() else \
            torch.empty(0, dtype=torch.uint8)
        view = byte_view(data)  # not .numpy(): it would mark a live storage as NumPy's for good
        kept.append(data)
        buffers[name] = view
        items.append((name, DTYPE_CODES[tensor.dtype], tuple(tensor.shape), view.nbytes, hash_bytes(view)))
    header, entries = build_header(items)
    header = _with_metadata(header, metadata)
    path = os.path.abspath(os.fspath(out))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex[:8]}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for entry in entries:
                f.write(buffers[entry.name])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise StoreError(f"writing {path} failed: {exc.strerror}") from exc
    return path


def _with_metadata(header: bytes, extra: dict[str, str]) -> bytes:
    parsed = json.loads(header[8:])
    parsed["__metadata__"].update(extra)
    text = json.dumps(parsed, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text


def load_weights(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a weights file written by ``export`` (or any safetensors file) into a state_dict,
    without unpickling anything.

    The header is checked (its size first) before any tensor byte is read; each tensor is read once
    into memory of its own, and checked against its hash where the file carries nbguard's."""
    reader = FileReader(os.fspath(path))
    try:
        try:
            header = read_header(reader)
        except CorruptSnapshotError:
            header = _plain_safetensors_header(reader)
        out = {}
        for name, entry in header.entries.items():
            hasher = xxhash.xxh3_128()
            data = reader.read_entry(header.data_start + entry.begin, entry.nbytes, hasher)
            if entry.hash and hasher.hexdigest() != entry.hash:
                raise CorruptSnapshotError(f"{os.fspath(path)}: tensor {name!r} is damaged (hash mismatch): "
                                           "export it again")
            dtype = CODE_DTYPES[entry.code]
            tensor = data.view(dtype) if entry.nbytes else torch.empty(0, dtype=dtype)
            out[name] = tensor.reshape(entry.shape).to(device)
        return out
    finally:
        reader.close()


def _plain_safetensors_header(reader: FileReader) -> BlobHeader:
    prefix = reader.pread(0, 8)
    if len(prefix) < 8:
        raise CorruptSnapshotError("not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", prefix)
    if length > min(MAX_HEADER_BYTES, reader.size - 8):
        raise CorruptSnapshotError("not a safetensors file (truncated header, or one of an absurd size)")
    raw = reader.pread(8, length)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CorruptSnapshotError(f"not a safetensors file: {exc}") from exc
    if not isinstance(header, dict):
        raise CorruptSnapshotError("not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    entries = {name: _parse_entry(name, spec, "", reader.size - 8 - length) for name, spec in header.items()}
    return BlobHeader(prefix + raw, 8 + length, entries)
