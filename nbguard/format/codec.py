"""Values to JSON and back, with tensors set aside — never pickle.

``encode`` turns a value (a state_dict, a ``history`` list, an RNG state ...) into a JSON-safe tree
and hands every tensor to a callback that returns a reference key. ``decode`` rebuilds the value
from the tree and a key → tensor lookup, accepting only the shapes ``encode`` produces.

Tags (a JSON object is always a tag; dicts are encoded as lists of pairs so any key type survives):
``$tuple`` ``$dict`` ``$set`` ``$frozenset`` ``$float`` (nan/inf) ``$complex`` ``$bytes``
``$tensor`` ``$ndarray`` ``$npscalar`` ``$dtype`` ``$device`` ``$size``.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ..errors import CaptureError, CorruptSnapshotError

MAX_DEPTH = 64
TensorSink = Callable[[str, torch.Tensor], str]
TensorSource = Callable[[str], torch.Tensor]


class Unstorable(CaptureError):
    """A value that nbguard cannot store without pickling it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def encode(value: Any, path: str, sink: TensorSink, depth: int = 0) -> Any:
    """A JSON-safe tree for ``value``; tensors go to ``sink(path, tensor)`` which returns their key."""
    if depth > MAX_DEPTH:
        raise Unstorable(path, "nested too deeply")
    if isinstance(value, torch.Tensor):  # first: a state_dict is mostly tensors
        return {"$tensor": sink(path, _check_tensor(value, path))}
    if value is None or type(value) in (bool, str):
        return value
    if type(value) is int:
        if value.bit_length() > 13000:
            raise Unstorable(path, "an int of more than 3900 digits cannot be stored in a snapshot")
        return value
    if type(value) is float:
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, np.generic):
        return _encode_numpy_scalar(value, path)
    if isinstance(value, np.ndarray):
        return {"$ndarray": sink(path, _ndarray_as_tensor(value, path))}
    if type(value) in (list, tuple):
        items = _plain_numbers(value)
        if items is None:
            items = [encode(v, f"{path}/{i}", sink, depth + 1) for i, v in enumerate(value)]
        return items if type(value) is list else {"$tuple": items}
    if isinstance(value, dict) and type(value).__module__ in ("builtins", "collections"):
        pairs = []
        for k, v in value.items():
            key = encode(k, f"{path}/<key>", _no_tensor_keys, depth + 1)
            pairs.append([key, encode(v, f"{path}/{_key_text(k)}", sink, depth + 1)])
        return {"$dict": pairs}
    if type(value) in (set, frozenset):
        items = [encode(v, f"{path}/<item>", _no_tensor_keys, depth + 1) for v in value]
        return {f"${type(value).__name__}": items}
    if type(value) is complex:
        return {"$complex": [encode(value.real, path, sink), encode(value.imag, path, sink)]}
    if type(value) is bytes:
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, torch.Size):
        return {"$size": list(value)}
    raise Unstorable(path, f"a {type(value).__module__}.{type(value).__qualname__} is not a plain value "
                           "(numbers, strings, lists, dicts, tensors, arrays) and has no state_dict()")


def _plain_numbers(values: list | tuple) -> list | None:
    """The values as they are when all are ints of at most 64 bits or all finite floats (a loss
    history, Python's RNG state of 625 ints): one pass instead of a call per item."""
    if len(values) < 8:
        return None
    types = set(map(type, values))
    if types == {int} and -(2**63) <= min(values) and max(values) < 2**64:
        return list(values)
    if types == {float} and all(map(math.isfinite, values)):
        return list(values)
    return None


def _no_tensor_keys(path: str, tensor: torch.Tensor) -> str:
    raise Unstorable(path, "tensors cannot be dict keys or set items in a snapshot")


def _key_text(key: object) -> str:
    return str(key).replace("/", "%2F")


def _check_tensor(tensor: torch.Tensor, path: str) -> torch.Tensor:
    if tensor.is_sparse or tensor.layout != torch.strided:
        raise Unstorable(path, f"{tensor.layout} tensors are not supported; convert with .to_dense()")
    if tensor.is_quantized:
        raise Unstorable(path, "quantized tensors are not supported; dequantize first")
    if tensor.device.type == "meta":
        raise Unstorable(path, "a tensor on the 'meta' device has no data")
    return tensor


def _ndarray_as_tensor(array: np.ndarray, path: str) -> torch.Tensor:
    if array.dtype.hasobject or array.dtype.kind in "USVMm":
        raise Unstorable(path, f"numpy arrays of dtype {array.dtype} are not supported")
    if any(s < 0 for s in array.strides):
        array = np.ascontiguousarray(array)
    try:
        return torch.from_numpy(array)
    except TypeError as exc:
        raise Unstorable(path, f"numpy dtype {array.dtype} has no torch equivalent") from exc


def _encode_numpy_scalar(value: np.generic, path: str) -> dict:
    if value.dtype.kind in "fc" and value.dtype.itemsize > (8 if value.dtype.kind == "f" else 16):
        raise Unstorable(path, f"numpy scalars of dtype {value.dtype} are not supported (convert to float64)")
    if value.dtype.kind in "biuf":
        item = value.item()
        if isinstance(item, float) and not math.isfinite(item):
            item = {"$float": repr(item)}
        return {"$npscalar": [value.dtype.str, item]}
    if value.dtype.kind == "c":
        return {"$npscalar": [value.dtype.str, [value.real.item(), value.imag.item()]]}
    raise Unstorable(path, f"numpy scalars of dtype {value.dtype} are not supported")


_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def decode(tree: Any, source: Callable[[str], Any], depth: int = 0) -> Any:
    """Rebuild a value from ``encode``'s tree; ``source(key)`` returns the tensor for a key."""
    if depth > MAX_DEPTH:
        raise CorruptSnapshotError("snapshot values are nested too deeply")
    if tree is None or type(tree) in (bool, int, float, str):
        return tree
    if type(tree) is list:
        return [decode(v, source, depth + 1) for v in tree]
    if type(tree) is not dict or len(tree) != 1:
        raise CorruptSnapshotError(f"unexpected value in snapshot: {_preview(tree)}")
    (tag, body), = tree.items()
    try:
        return _decode_tag(tag, body, source, depth)
    except CorruptSnapshotError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, RuntimeError) as exc:
        raise CorruptSnapshotError(f"malformed {tag} value in snapshot: {exc}") from exc


def _decode_tag(tag: str, body: Any, source: TensorSource, depth: int) -> Any:
    if tag == "$tuple":
        return tuple(decode(v, source, depth + 1) for v in _list(body))
    if tag == "$dict":
        out = {}
        for pair in _list(body):
            if type(pair) is not list or len(pair) != 2:
                raise CorruptSnapshotError("malformed dict entry in snapshot")
            out[_hashable(decode(pair[0], source, depth + 1))] = decode(pair[1], source, depth + 1)
        return out
    if tag in ("$set", "$frozenset"):
        items = [_hashable(decode(v, source, depth + 1)) for v in _list(body)]
        return set(items) if tag == "$set" else frozenset(items)
    if tag == "$float":
        return _FLOATS[body]
    if tag == "$complex":
        re, im = (decode(v, source, depth + 1) for v in _list(body))
        return complex(float(re), float(im))
    if tag == "$bytes":
        return base64.b64decode(_str(body), validate=True)
    if tag == "$tensor":
        return source(_str(body))
    if tag == "$ndarray":
        return source(_str(body)).numpy()
    if tag == "$npscalar":
        dtype_text, item = _list(body)
        dtype = np.dtype(_str(dtype_text))
        if dtype.kind not in "biufc":
            raise CorruptSnapshotError(f"unsupported numpy scalar dtype {dtype}")
        if dtype.kind == "c":
            re, im = _list(item)
            return dtype.type(complex(float(re), float(im)))
        return dtype.type(decode(item, source, depth + 1))
    if tag == "$dtype":
        torch_dtype = getattr(torch, _str(body), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise CorruptSnapshotError(f"unknown dtype {body!r} in snapshot")
        return torch_dtype
    if tag == "$device":
        return torch.device(_str(body))
    if tag == "$size":
        dims = _list(body)
        if not all(type(d) is int for d in dims):
            raise CorruptSnapshotError("malformed torch.Size in snapshot")
        return torch.Size(dims)
    raise CorruptSnapshotError(f"unknown value tag {tag!r} in snapshot (written by a newer nbguard?)")


def _list(body: Any) -> list:
    if type(body) is not list:
        raise CorruptSnapshotError(f"expected a list in snapshot, found {_preview(body)}")
    return body


def _str(body: Any) -> str:
    if type(body) is not str:
        raise CorruptSnapshotError(f"expected a string in snapshot, found {_preview(body)}")
    return body


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError as exc:
        raise CorruptSnapshotError("a dict key in the snapshot is not hashable") from exc
    return value


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def tensor_refs(tree: Any, depth: int = 0) -> list[str]:
    """Every tensor key a tree refers to (for partial reads and validation)."""
    if depth > MAX_DEPTH:
        raise CorruptSnapshotError("snapshot values are nested too deeply")
    if type(tree) is list:
        return [k for v in tree for k in tensor_refs(v, depth + 1)]
    if type(tree) is dict and len(tree) == 1:
        (tag, body), = tree.items()
        if tag in ("$tensor", "$ndarray"):
            return [body] if isinstance(body, str) else []
        if tag in ("$tuple", "$dict", "$set", "$frozenset") and type(body) is list:
            return [k for v in body for k in tensor_refs(v, depth + 1)]
    return []


def is_plain(value: Any) -> bool:
    """Whether ``encode`` accepts ``value`` (without touching tensor data)."""
    try:
        encode(value, "value", lambda path, tensor: "")
    except CaptureError:
        return False
    return True


def encode_mapping(values: Mapping[str, Any], sink: TensorSink) -> dict[str, Any]:
    """Encode each value of a name → value mapping under its name."""
    return {name: encode(value, name, sink) for name, value in values.items()}
