"""The manifest: one JSON file per snapshot, written last, the only commit point.

Store layout (one store folder can hold many runs; blobs are shared between them)::

    blobs/<2 hex>/<32 hex>.safetensors      tensor bytes, content-addressed
    runs/<run>/snapshots/<id>.json          one manifest per snapshot
    runs/<run>/pins/<id>                    an empty file: the snapshot is pinned

Reading a manifest validates every field before anything else looks at it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptSnapshotError, SnapshotError, UsageError
from .jsonsafe import no_duplicate_keys

FORMAT = "nbguard.snapshot"
VERSION = 1
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_JSON_DEPTH = 200

MAX_ENTRIES = 100_000  # tensors, storages, objects: beyond any model (a 10k-tensor model with Adam has 40k)
# Every JSON object needs a literal '{': counting them bounds the parsing work before any parsing.
MAX_JSON_OBJECTS = 8 * MAX_ENTRIES
LATEST_TIME = 253402300799.0  # 9999-12-31: later creation times are damage, not dates
_ID = re.compile(r"^\d{8}T\d{6}-\d{3}-[0-9a-f]{4}\Z")
_RUN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
_HEX32 = re.compile(r"^[0-9a-f]{32}\Z")
OBJECT_KINDS = ("stateful", "generator", "value")


def new_id(now: float | None = None) -> str:
    """A snapshot id that sorts by time and is unique across processes: 20261125T101500-123-ab12."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}-{int(now * 1000) % 1000:03d}-{secrets.token_hex(2)}"


def is_metric(name: object, value: object) -> bool:
    """Whether a metric can be stored and read back: a text name and a finite number."""
    return isinstance(name, str) and (type(value) is int or type(value) is float) and abs(value) <= sys.float_info.max


def check_run_name(run: str) -> str:
    """Run names become folder names: letters, digits, '.', '_' and '-'."""
    if not isinstance(run, str) or not _RUN.match(run):
        raise UsageError(
            f"invalid run name {run!r}: use up to 100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return run


def slug(text: str) -> str:
    """A run-name-safe version of any text."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:100]
    return cleaned or "run"


def manifest_path(run: str, snapshot_id: str) -> str:
    return f"runs/{run}/snapshots/{snapshot_id}.json"


def pin_path(run: str, snapshot_id: str) -> str:
    return f"runs/{run}/pins/{snapshot_id}"


def is_snapshot_id(text: str) -> bool:
    return bool(_ID.match(text))


def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return json.dumps(body, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def checksum_of(manifest: dict[str, Any]) -> str:
    """The xxh3 of a manifest's content (every field but ``checksum``, keys sorted)."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(_canonical(manifest))


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    """The manifest's bytes, with a checksum of its content: a flipped bit anywhere (a number in
    ``history`` included) is found on read."""
    checked = {**manifest, "checksum": checksum_of(manifest)}
    return json.dumps(checked, separators=(",", ":"), allow_nan=False).encode()


def _depth_checked(value: Any, depth: int = 0) -> None:
    if depth > MAX_JSON_DEPTH:
        raise CorruptSnapshotError("manifest is nested too deeply")
    if isinstance(value, dict):
        for v in value.values():
            _depth_checked(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _depth_checked(v, depth + 1)


def _reject_constant(name: str) -> None:
    raise CorruptSnapshotError(f"manifest contains {name}, which JSON does not allow")


def parse_manifest(data: bytes, *, where: str = "manifest") -> dict[str, Any]:
    """Parse and validate a manifest; CorruptSnapshotError/SnapshotError say what is wrong."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise CorruptSnapshotError(f"{where} is implausibly large ({len(data)} bytes)")
    if bytes(data).count(b"{") > MAX_JSON_OBJECTS:
        raise CorruptSnapshotError(f"{where} holds implausibly many entries (more than {MAX_JSON_OBJECTS} objects)")
    try:
        manifest = json.loads(data, object_pairs_hook=no_duplicate_keys("manifest"), parse_constant=_reject_constant)
    except RecursionError as exc:
        raise CorruptSnapshotError(f"{where} is nested too deeply") from exc
    except ValueError as exc:
        raise CorruptSnapshotError(f"{where} is not valid JSON (truncated or damaged): {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptSnapshotError(f"{where} is not an nbguard snapshot manifest")
    for name in ("tensors", "storages", "objects"):  # before any work proportional to the entries
        if isinstance(manifest.get(name), dict) and len(manifest[name]) > MAX_ENTRIES:
            raise CorruptSnapshotError(f"{where}: {name} has more than {MAX_ENTRIES} entries")
    _depth_checked(manifest)
    version = manifest.get("version")
    if type(version) is not int:
        raise CorruptSnapshotError(f"{where} has no valid format version")
    if version > VERSION:
        raise SnapshotError(
            f"{where} was written by a newer nbguard (format {version}; this one reads {VERSION}): "
            "upgrade with pip install -U nbguard"
        )
    if version < 1:
        raise CorruptSnapshotError(f"{where} has an invalid format version {version}")
    try:
        expected = checksum_of(manifest)
    except (TypeError, ValueError, RecursionError) as exc:
        raise CorruptSnapshotError(f"{where} holds values JSON cannot express: {exc}") from exc
    if manifest.get("checksum") != expected:
        raise CorruptSnapshotError(f"{where} is damaged (its checksum does not match)")
    _validate(manifest, where)
    return manifest


def _expect(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise CorruptSnapshotError(f"{where}: {what}")


def _validate(m: dict[str, Any], where: str) -> None:
    _expect(isinstance(m.get("id"), str) and is_snapshot_id(m["id"]), where, "invalid snapshot id")
    _expect(isinstance(m.get("run"), str) and bool(_RUN.match(m["run"])), where, "invalid run name")
    _expect(type(m.get("created")) in (int, float) and 0 <= m["created"] <= LATEST_TIME, where, "invalid creation time")
    _expect(isinstance(m.get("writer"), str) and len(m["writer"]) <= 200, where, "invalid writer id")
    _expect(m.get("lineage") is None or (isinstance(m["lineage"], str) and len(m["lineage"]) <= 200), where,
            "invalid lineage")
    _expect(m.get("parent") is None or (isinstance(m["parent"], str) and is_snapshot_id(m["parent"])), where,
            "invalid parent snapshot id")
    metrics = m.get("metrics")
    _expect(isinstance(metrics, dict) and all(is_metric(k, v) for k, v in metrics.items()), where,
            "metrics must map names to numbers")

    _expect(m.get("note") is None or isinstance(m["note"], str), where, "note must be text")
    _expect(isinstance(m.get("tags"), list) and all(isinstance(t, str) for t in m["tags"]), where, "tags must be a list of text")
    for name in ("size", "written"):
        _expect(type(m.get(name)) is int and 0 <= m[name] < 2**60, where, f"invalid {name}")
    _expect(isinstance(m.get("versions"), dict), where, "missing versions")
    _expect(isinstance(m.get("storages"), dict), where, "storages must be an object")
    storages = m["storages"]
    for key, s in storages.items():
        _expect(isinstance(s, dict) and isinstance(s.get("blob"), str) and bool(_HEX32.match(s["blob"]))
                and isinstance(s.get("entry"), str) and type(s.get("nbytes")) is int and 0 <= s["nbytes"] < 2**50
                and isinstance(s.get("hash"), str) and bool(_HEX32.match(s["hash"])), where, f"storage {key!r} is malformed")
    _expect(isinstance(m.get("tensors"), dict), where, "tensors must be an object")
    tensors = m["tensors"]
    for key, t in tensors.items():
        _expect(isinstance(t, dict) and isinstance(t.get("storage"), str) and t["storage"] in storages, where, f"tensor {key!r} refers to a missing storage")
        shape, stride, offset = t.get("shape"), t.get("stride"), t.get("byte_offset")
        _expect(isinstance(shape, list) and isinstance(stride, list) and len(shape) == len(stride) <= 64
                and all(type(d) is int and 0 <= d < 2**50 for d in shape)
                and all(type(s) is int and 0 <= s < 2**50 for s in stride)
                and type(offset) is int and offset >= 0, where, f"tensor {key!r} has an invalid layout")
        _expect(isinstance(t.get("dtype"), str) and isinstance(t.get("device"), str)
                and isinstance(t.get("requires_grad"), bool), where, f"tensor {key!r} is malformed")
    _expect(isinstance(m.get("objects"), dict), where, "objects must be an object")
    objects = m["objects"]
    for name, obj in objects.items():
        _expect(isinstance(obj, dict) and obj.get("kind") in OBJECT_KINDS and isinstance(obj.get("type"), str)
                and "tree" in obj, where, f"object {name!r} is malformed")
    _expect(isinstance(m.get("skipped"), dict), where, "skipped must be an object")
    for field in ("rng", "position", "extra"):
        _expect(field in m, where, f"missing {field}")


@dataclass(frozen=True)
class SnapshotInfo:
    """What the catalog shows about a snapshot, without reading its tensors."""

    id: str
    run: str
    created: float
    position: Any
    metrics: dict[str, float]
    note: str | None
    tags: tuple[str, ...]
    size: int
    written: int
    objects: tuple[str, ...]
    pinned: bool = False
    state: str = "local"  # durability: local, uploading, verified, ...
    path: str = ""
    writer: str = ""  # the Guard (process) that saved it
    lineage: str | None = None  # the kernel or script it came from, when known (see Guard's ``lineage``)
    parent: str | None = None  # the snapshot its state descends from: restored from or saved before

    @property
    def label(self) -> str:
        """'epoch 3, batch 120' from the loop position, if the saver gave one."""
        from ..humanize import position_label

        return position_label(self.position)


def info_from(manifest: dict[str, Any], *, pinned: bool = False, state: str = "local") -> SnapshotInfo:
    from .codec import decode

    def no_tensors(key: str):
        raise CorruptSnapshotError("a loop position refers to a tensor")

    return SnapshotInfo(
        id=manifest["id"],
        run=manifest["run"],
        created=float(manifest["created"]),
        position=decode(manifest["position"], no_tensors),
        metrics=dict(manifest["metrics"]),
        note=manifest.get("note"),
        tags=tuple(manifest["tags"]),
        size=manifest["size"],
        written=manifest["written"],
        objects=tuple(manifest["objects"]),
        pinned=pinned,
        state=state,
        path=manifest_path(manifest["run"], manifest["id"]),
        writer=manifest["writer"],
        lineage=manifest.get("lineage"),
        parent=manifest.get("parent"),
    )


def writer_id() -> str:
    """Identifies one process's writer: host-independent, unique enough."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"
