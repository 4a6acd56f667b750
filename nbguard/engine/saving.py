"""The steps of one save below ``Guard``: its arguments checked, its blob written under the writer's
lease, and whether a new state is the same as the last one committed."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import NbguardError, StoreError, UsageError
from ..format.blobfile import Item, blob_path, write_blob
from ..format.manifest import is_metric
from ..stores import Store
from . import leases
from .staging import Group, StoredEntry


@dataclass(frozen=True)
class SaveStats:
    """Figures of one save."""

    stall: float  # seconds the caller was blocked
    staged_bytes: int
    reused_bytes: int
    written_bytes: int = 0
    durable_after: float = 0.0  # seconds from the call until the manifest was committed
    streaming: bool = False


# -- writing -----------------------------------------------------------------------------------
def write_under_lease(store: Store, writer_id: str, entries: dict[str, StoredEntry], items: list[Item],
                      published: list[str]) -> tuple[dict[str, StoredEntry], int]:
    """Write ``items`` as one blob; returns every group's entry (``entries``, the kept ones, plus the
    new) and the bytes written. The writer's lease claims every blob the coming manifest names before
    the new blob appears; its name is added to ``published`` then."""
    reused = {e.blob for e in entries.values()}

    def claim(name: str) -> None:
        leases.hold(store, writer_id, reused | {name})
        published.append(name)

    if items:
        name, layout, written = write_blob(store, items, before_publish=claim)
    else:
        leases.hold(store, writer_id, reused)
        name, layout, written = "", [], 0
    # A blob of an earlier snapshot that another process deleted before the lease existed cannot be
    # referenced: this save fails and the next one writes those bytes anew.
    gone = sorted(b for b in reused if not store.exists(blob_path(b)))
    if gone:
        raise StoreError(f"blob {gone[0]} of an earlier snapshot was deleted while saving (another process "
                         "cleaning up?); the next save writes its bytes again")
    entries = dict(entries)
    for entry in layout:
        entries[entry.name] = StoredEntry(name, entry.name, entry.code, entry.shape, entry.nbytes, entry.hash)
    return entries, written


def release_lease(store: Store, writer_id: str) -> None:
    """Drop the writer's lease once its manifest is committed (or its save given up)."""
    try:
        leases.release(store, writer_id)
    except NbguardError:
        pass  # a lease left behind only keeps this save's blobs until the next save or this process ends


def stale_message(groups: list[Group]) -> str:
    """What the user is told when reused tensors were found changed behind their version counters."""
    names = [g.members[0][0] for g in groups]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (f"{shown} changed without torch's version counter noticing (a native kernel such as BatchNorm's, "
            "`.data`, NumPy or a raw pointer): the snapshot was not kept and is taken again at the next safe point; "
            "from now on these tensors are copied at every save")


def same_state(manifest: Mapping[str, Any], last: Mapping[str, Any]) -> bool:
    """Whether two manifests describe the same state (they may differ in id, time, tags and note)."""
    keys = ("run", "position", "metrics", "objects", "rng", "tensors", "extra")

    def contents(m: Mapping[str, Any]) -> dict[str, Any]:  # by content: the same bytes may sit in another blob
        return {key: (entry["hash"], entry["nbytes"]) for key, entry in m.get("storages", {}).items()}

    return bool(last) and all(manifest.get(k) == last.get(k) for k in keys) and contents(manifest) == contents(last)


# -- checking the arguments ---------------------------------------------------------------------
def check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    """Metrics as stored: every one must read back (any finite number; nan and inf are dropped)."""
    out = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(name, str):
            raise UsageError(f"metric names must be text, not {type(name).__name__} ({name!r})")
        if type(value) is float and not math.isfinite(value):
            continue  # nan/inf metrics are dropped rather than breaking the save
        if not is_metric(name, value):
            what = "a number too large to store" if type(value) is int else type(value).__name__
            raise UsageError(f"metric {name!r} must be a number, not {what}")
        out[name] = value
    return out


def check_tags(tags: Iterable[str]) -> list[str]:
    """Tags as stored: sorted, each once; a single text is one tag."""
    if isinstance(tags, str):
        tags = [tags]
    tags = list(tags)
    bad = [t for t in tags if not isinstance(t, str)]
    if bad:
        raise UsageError(f"tags must be text, not {type(bad[0]).__name__} ({bad[0]!r})")
    return sorted(set(tags))


def check_lineage(lineage: str) -> str:
    if not isinstance(lineage, str) or not lineage or len(lineage) > 200:
        raise UsageError(f"lineage must be a short non-empty text, not {lineage!r}")
    return lineage


def default_lineage() -> str | None:
    """The Jupyter kernel's id (it survives a kernel restart), or None outside a kernel."""
    if "ipykernel" not in sys.modules:  # not in a kernel (and never import one: scripts stay light)
        return None
    try:
        from ipykernel import get_connection_file

        name = os.path.basename(get_connection_file())
    except Exception:  # not in a kernel
        return None
    return name.removeprefix("kernel-").removesuffix(".json")[:200] or None


def no_tensors(path: str, tensor: torch.Tensor) -> str:
    """The tensor sink of a loop position: positions hold no tensors."""
    raise UsageError(f"{path}: a loop position must be plain numbers and text, not a tensor")
