"""Writer leases: which blobs a save in flight is about to reference.

A blob becomes referenced when its manifest is committed, but it is written before that. So while a
save is in flight its writer holds ``leases/<writer>.json`` listing every blob the coming manifest
names (new and reused ones), written before any new blob is moved into place and removed once the
manifest is committed. Whoever deletes blobs (retention, ``gc``) spares every blob named by a
manifest or by a live lease, and reads the leases before the manifests: a writer's lease is removed
only after its manifest exists, so one of the two is always seen.

A lease is live unless its writer is provably gone (same machine, no such process) or it has not
been refreshed for ``LEASE_SECONDS`` (a writer on another machine that died mid-save).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import StoreError
from ..stores.owner import host_id, writer_gone

FOLDER = "leases"
LEASE_SECONDS = 6 * 3600.0
MAX_LEASE_BYTES = 4 * 1024 * 1024
_WRITER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Lease:
    """One writer's claim on the blobs of its save in flight."""

    writer: str
    host: str
    pid: int
    refreshed: float
    blobs: frozenset[str]
    path: str

    def live(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return not writer_gone(self.host, self.pid) and now - self.refreshed < LEASE_SECONDS


def lease_path(writer: str) -> str:
    if not _WRITER.match(writer):
        raise ValueError(f"invalid writer id {writer!r}")
    return f"{FOLDER}/{writer}.json"


def hold(store, writer: str, blobs: Iterable[str]) -> None:
    """Write (or refresh) ``writer``'s lease on ``blobs``."""
    body = {"writer": writer, "host": host_id(), "pid": os.getpid(), "refreshed": time.time(),
            "blobs": sorted(set(blobs))}
    store.write(lease_path(writer), [json.dumps(body, separators=(",", ":")).encode()])


def release(store, writer: str) -> None:
    """Remove ``writer``'s lease (its manifest is committed, or its save failed)."""
    store.delete(lease_path(writer))


def read_all(store) -> tuple[list[Lease], dict[str, str]]:
    """Every lease in the store, and {path: problem} for files that are not valid leases."""
    leases, problems = [], {}
    for info in store.list(FOLDER):
        if not info.path.endswith(".json"):
            continue
        if info.size > MAX_LEASE_BYTES:
            problems[info.path] = f"implausibly large ({info.size} bytes)"
            continue
        try:
            leases.append(_parse(store.read(info.path), info.path))
        except StoreError as exc:
            if store.exists(info.path):
                problems[info.path] = str(exc)
        except (ValueError, TypeError, KeyError) as exc:
            problems[info.path] = f"not a valid lease: {exc}"
    return leases, problems


def _parse(data: bytes, path: str) -> Lease:
    body = json.loads(data)
    blobs = body["blobs"]
    if not (isinstance(body, dict) and isinstance(body["writer"], str) and isinstance(body["host"], str)
            and type(body["pid"]) is int and type(body["refreshed"]) in (int, float) and isinstance(blobs, list)
            and all(isinstance(b, str) and _HEX32.match(b) for b in blobs)):
        raise ValueError("malformed fields")
    return Lease(body["writer"], body["host"], body["pid"], float(body["refreshed"]), frozenset(blobs), path)
