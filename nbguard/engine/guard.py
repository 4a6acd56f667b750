"""``Guard``: the session object that saves, restores and lists the snapshots of one run.

It works the same from a plain script and under the notebook magics::

    guard = nbguard.Guard("checkpoints", run="mnist", keep=3, best=("val_loss", "min"))
    for epoch in range(start, 20):
        ...
        guard.save({"model": model, "opt": opt, "sched": sched, "history": history},
                   metrics={"val_loss": val_loss}, position={"epoch": epoch})
    guard.flush()

``save`` returns as soon as the state is copied into reused memory buffers; hashing and writing
happen on one background thread, and storage trouble is reported, never raised into the loop.
"""

from __future__ import annotations

import math
import os
import platform
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..errors import NbguardError, StaleCaptureError, StoreError, UsageError
from ..format.blobfile import Item, blob_path, hash_bytes, write_blob
from ..format.codec import encode
from ..format.manifest import (
    FORMAT,
    VERSION,
    SnapshotInfo,
    check_run_name,
    encode_manifest,
    info_from,
    is_metric,
    manifest_path,
    new_id,
)
from ..format.manifest import writer_id as new_writer_id
from ..stores import Store
from ..version import __version__
from . import leases
from .capture import capture
from .catalog import Catalog
from .report import RestoreReport
from .retention import Policy
from .snapshot import Snapshot
from .staging import StagedSnapshot, StagingArea, StoredEntry
from .writer import SaveHandle, Writer

Reporter = Callable[[str], None]


def print_report(message: str) -> None:
    """The default reporter: one line on stderr."""
    print(f"nbguard: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class SaveStats:
    """Figures of one save."""

    stall: float  # seconds the caller was blocked
    staged_bytes: int
    reused_bytes: int
    written_bytes: int = 0
    durable_after: float = 0.0  # seconds from the call until the manifest was committed
    streaming: bool = False


class Guard:
    """Saves and restores the full training state of one run in one store."""

    def __init__(
        self,
        store: Store | str | os.PathLike[str] = "nbguard-snapshots",
        *,
        run: str = "default",
        keep: int = 3,
        best: tuple[str, str] | str | None = None,
        keep_best: int = 1,
        report: Reporter | None = print_report,
        track_changes: bool = True,
        lineage: str | None = None,
    ):
        """``lineage`` names where the state comes from (a kernel, a script), recorded in every
        snapshot (``SnapshotInfo.lineage``) so a resume can tell its own snapshots from another
        kernel's in the same run; None: the Jupyter kernel's id when there is one."""
        self.catalog = store if isinstance(store, Catalog) else Catalog(store)
        self.store = self.catalog.store
        self.run = check_run_name(run)
        if isinstance(best, str):
            best = Policy.parse_best(best)
        self.policy = Policy(keep=keep, best_metric=best[0] if best else None,
                             best_mode=best[1] if best else "min", best_k=keep_best)
        self.writer_id = new_writer_id()
        self.lineage = default_lineage() if lineage is None else _check_lineage(lineage)
        self.parent: str | None = None  # the snapshot the live state descends from (restored or saved)
        self._swept = False
        self._report = report or (lambda message: None)
        self._reported: set[str] = set()
        self._staging = StagingArea(track_changes=track_changes)
        self._writer = Writer()
        self._lock = threading.Lock()
        self.last_stats: SaveStats | None = None
        self.last_saved: SnapshotInfo | None = None
        self.last_error: BaseException | None = None
        # Set when a save had to be dropped because a tensor changed behind its version counter;
        # ``on_retake`` (the guarded run's safe-point request) is called then, from the writer thread.
        self.retake_due = False
        self.on_retake: Callable[[], None] | None = None
        self._streaming_said = False
        self._last_value_trees: dict[str, Any] = {}
        self._last_manifest: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"Guard(store={self.store.url!r}, run={self.run!r}, keep={self.policy.keep})"

    # -- saving ------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Whether a save is still being written (a new ``save`` would wait for it)."""
        return self._writer.busy

    def save(
        self,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, float] | None = None,
        position: Any = None,
        note: str | None = None,
        tags: Iterable[str] = (),
        extra: Any = None,
        wait: bool = False,
        unless_same: bool = False,
    ) -> SaveHandle[SnapshotInfo]:
        """Snapshot ``state`` (name → object or value) plus every RNG.

        Returns once the state is staged in memory; the handle's ``wait()``/``result()`` tell when
        it is durable. Values that cannot be stored are skipped with a one-line warning. With
        ``unless_same``, a state identical to the last snapshot's (same bytes, values, position and
        extra) is not committed again: the handle gives the last snapshot (one snapshot per state).
        """
        metrics = _check_metrics(metrics)
        tags = _check_tags(tags)
        if note is not None and not isinstance(note, str):
            raise UsageError(f"note must be text, not {type(note).__name__}")
        for _ in range(3):  # a retake copies what went stale, so it cannot go stale the same way
            handle = self._save_once(state, metrics, position, note, tags, extra, unless_same)
            if not wait:
                return handle
            self._writer.flush()  # durable, and old snapshots cleaned up
            if not isinstance(handle._error, StaleCaptureError):
                break
        return handle

    def prepare(self, state: Mapping[str, Any], *, wait: bool = False) -> None:
        """Get staging memory ready for ``state`` in the background (the first save then stalls no
        longer than a steady one); ``wait`` blocks until it is. The guarded run calls it as it starts."""
        with self._lock:
            self._staging.prefault(capture(state, with_rng=False).tensors)
            if wait:
                self._staging.wait_prefault()

    def _save_once(self, state: Mapping[str, Any], metrics: dict[str, float], position: Any, note: str | None,
                   tags: Iterable[str], extra: Any, unless_same: bool) -> SaveHandle[SnapshotInfo]:
        started = time.perf_counter()
        with self._lock:
            self._writer.flush()  # at most one save in flight: its buffers are about to be reused
            snapshot_id = new_id()
            self._staging.drop_missing(self.store)
            captured = capture(state)
            for name, reason in captured.skipped.items():
                self._say_once(f"skip:{name}:{reason}", f"not saving {name}: {reason}")
            position_tree = encode(position, "position", _no_tensors)
            extra_tree = encode(extra, "extra", captured.sink_for(captured.tensors))
            staged = self._staging.stage(captured.tensors, volatile=captured.volatile)
            manifest = {
                "format": FORMAT, "version": VERSION, "id": snapshot_id, "run": self.run,
                "created": time.time(), "writer": self.writer_id, "lineage": self.lineage,
                "parent": self.parent, "position": position_tree,
                "metrics": metrics, "note": note, "tags": tags,
                "versions": {"nbguard": __version__, "torch": torch.__version__, "numpy": np.__version__,
                             "python": platform.python_version()},
                "objects": captured.objects, "rng": captured.rng, "skipped": captured.skipped,
                "tensors": staged.layouts, "storages": {}, "size": 0, "written": 0, "extra": extra_tree,
            }
            stall = time.perf_counter() - started
            stats = SaveStats(stall, staged.staged_bytes, staged.reused_bytes, streaming=staged.streaming)
            handle: SaveHandle[SnapshotInfo] = SaveHandle(snapshot_id)
            job = lambda: self._write(manifest, staged, stats, started, unless_same)  # noqa: E731
            if staged.streaming:
                if not self._streaming_said:
                    self._streaming_said = True
                    self._report("not enough free memory to stage a copy of the state: saving directly from the "
                                 "live tensors instead (training waits for the write; no extra memory is used)")
                self._writer.run_inline(job, handle, then=self._after_write)
            else:
                self._writer.submit(job, handle, then=self._after_write)
        return handle

    def _write(self, manifest: dict[str, Any], staged: StagedSnapshot, stats: SaveStats, started: float,
               unless_same: bool = False) -> SnapshotInfo:
        published: list[str] = []
        try:
            stale = self._staging.verify_reused(staged.groups)
            if stale:
                raise StaleCaptureError(_stale_message(stale))
            entries, written = self._write_blob(staged, published)
            manifest["storages"] = {
                g.key: {"blob": entries[g.key].blob, "entry": entries[g.key].entry,
                        "nbytes": entries[g.key].nbytes, "hash": entries[g.key].hash}
                for g in staged.groups
            }
            manifest["size"] = sum(e.nbytes for e in entries.values())
            manifest["written"] = written
            if unless_same and self.last_saved is not None and _same_state(manifest, self._last_manifest):
                # Nothing is committed: entries that only a skipped manifest would reference must not be
                # reused by a later save (the blob they sit in may be collected as unused).
                self._staging.forget(staged.groups)
                self._clean_up_failed(published)  # releases the lease; collects blobs only it named
                return self.last_saved
            path = manifest_path(self.run, manifest["id"])
            self.store.write(path, [encode_manifest(manifest)])
        except BaseException as exc:
            self._staging.forget(staged.groups)
            self._clean_up_failed(published)
            if isinstance(exc, StaleCaptureError):
                self._say_once(f"stale:{exc}", str(exc))
                self.retake_due = True
                if self.on_retake is not None:
                    self.on_retake()
                raise
            self.last_error = exc
            if isinstance(exc, Exception):
                self._say_once(f"store:{exc}", f"{exc}. Training goes on; earlier snapshots are intact and the next "
                                               "save tries again.")
            raise
        self._release()
        self._staging.commit(staged.groups, entries)
        self.retake_due = False
        self.parent = manifest["id"]
        if any(key.startswith("store:") for key in self._reported):
            self._reported = {key for key in self._reported if not key.startswith("store:")}
            self._report("saving works again")
        self._last_value_trees = {name: obj["tree"] for name, obj in manifest["objects"].items() if obj["kind"] == "value"}
        self._last_manifest = manifest
        info = info_from(manifest, state=self.catalog.state_of(path))
        self.last_error = None
        self.last_saved = info
        self.last_stats = replace(stats, written_bytes=written, durable_after=time.perf_counter() - started)
        return info

    def _after_write(self, info: SnapshotInfo | None) -> None:
        """Retention, once the handle says durable (a later save still waits for it)."""
        if info is None:
            return
        try:
            self.catalog.apply_retention(self.run, self.policy)
            if not self._swept:  # once per writer: what crashed writers left behind
                self._swept = True
                self.catalog.sweep()
        except NbguardError as exc:
            self._say_once(f"retention:{exc}", f"cleaning up old snapshots failed: {exc}")
        self.catalog.notify("saved", info)

    def _hold(self, blobs: set[str]) -> None:
        """Claim the blobs the coming manifest names, before any of them can be seen unreferenced."""
        leases.hold(self.store, self.writer_id, blobs)

    def _release(self) -> None:
        try:
            leases.release(self.store, self.writer_id)
        except NbguardError:
            pass  # a lease left behind only keeps this save's blobs until the next save or this process ends

    def _clean_up_failed(self, published: list[str]) -> None:
        """A failed save leaves no blob behind that nothing uses (a full disk must be able to recover)."""
        self._release()
        if published:
            try:
                self.catalog.collect(set(published))
            except NbguardError:
                pass

    def _write_blob(self, staged: StagedSnapshot, published: list[str]) -> tuple[dict[str, StoredEntry], int]:
        entries: dict[str, StoredEntry] = {}
        new: list[Item] = []
        for group in staged.groups:
            if group.reuse is not None:
                entries[group.key] = group.reuse
                continue
            view = memoryview(group.buffer.numpy()).cast("B") if group.nbytes else memoryview(b"")
            previous = self._staging.previous_entry(group.key)
            digest = None
            if group.suspect and previous is not None and previous.nbytes == group.nbytes:
                # Copied although its counters had not moved: often the bytes turn out unchanged.
                digest = hash_bytes(view)
                if digest == previous.hash:
                    entries[group.key] = previous
                    continue
            new.append((group.key, *group.entry_layout(), view, digest))
        reused = {e.blob for e in entries.values()}

        def claim(name: str) -> None:
            self._hold(reused | {name})
            published.append(name)

        if new:
            name, layout, written = write_blob(self.store, new, before_publish=claim)
        else:
            self._hold(reused)
            name, layout, written = "", [], 0
        # A blob of an earlier snapshot that another process deleted before the lease existed cannot be
        # referenced: this save fails and the next one writes those bytes anew.
        gone = sorted(b for b in reused if not self.store.exists(blob_path(b)))
        if gone:
            raise StoreError(f"blob {gone[0]} of an earlier snapshot was deleted while saving (another process "
                             "cleaning up?); the next save writes its bytes again")
        if not new:
            return entries, 0
        for entry in layout:
            entries[entry.name] = StoredEntry(name, entry.name, entry.code, entry.shape, entry.nbytes, entry.hash)
        return entries, written

    def changed_since_last(self, state: Mapping[str, Any]) -> bool:
        """Whether ``state`` differs from the last committed snapshot (tensors by version and identity,
        plain values by content); copies nothing."""
        if self.last_saved is None:
            return True
        captured = capture(state, with_rng=False)
        if self._staging.would_copy(captured.tensors):
            return True
        trees = {name: obj["tree"] for name, obj in captured.objects.items() if obj["kind"] == "value"}
        return trees != self._last_value_trees

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the last save is durable; False on timeout."""
        return self._writer.flush(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush and stop the background writer."""
        return self._writer.close(timeout)

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            self._report(message)

    # -- reading -----------------------------------------------------------------------------
    def snapshots(self) -> list[SnapshotInfo]:
        """This run's snapshots, newest first."""
        return self.catalog.snapshots(self.run)

    def latest(self) -> SnapshotInfo | None:
        """The newest snapshot of this run (damaged ones are reported once and left out)."""
        snapshots = self.snapshots()
        for path, problem in self.catalog.problems.items():
            if f"runs/{self.run}/" in path:
                self._say_once(_damage_key(path), f"{path} is damaged and is ignored: {problem}")
        return snapshots[0] if snapshots else None

    def load(self, ref: str = "latest") -> Snapshot:
        return self.catalog.get(ref, self.run)

    def restore(
        self,
        state: Mapping[str, Any] | None = None,
        ref: str = "latest",
        *,
        namespace: MutableMapping[str, Any] | None = None,
        rng: bool = True,
    ) -> RestoreReport:
        """Restore a snapshot of this run into live objects. 'latest' falls back to the newest intact
        snapshot when the newest is damaged, and says so."""
        self.flush()
        if ref == "latest":
            snapshot, skipped = self.catalog.latest_good(self.run)
            for message in skipped:
                self._say_once(_damage_key(message), message)
        else:
            snapshot, skipped = self.catalog.get(ref, self.run), []
        report = snapshot.restore(state, namespace=namespace, rng=rng)
        self.parent = snapshot.id
        report.notes.extend(skipped)
        return report


def _stale_message(groups: list) -> str:
    names = [g.members[0][0] for g in groups]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (f"{shown} changed without torch's version counter noticing (a native kernel such as BatchNorm's, "
            "`.data`, NumPy or a raw pointer): the snapshot was not kept and is taken again at the next safe point; "
            "from now on these tensors are copied at every save")


def _same_state(manifest: Mapping[str, Any], last: Mapping[str, Any]) -> bool:
    """Whether two manifests describe the same state (they may differ in id, time, tags and note)."""
    keys = ("run", "position", "metrics", "objects", "rng", "tensors", "extra")

    def contents(m: Mapping[str, Any]) -> dict[str, Any]:  # by content: the same bytes may sit in another blob
        return {key: (entry["hash"], entry["nbytes"]) for key, entry in m.get("storages", {}).items()}

    return bool(last) and all(manifest.get(k) == last.get(k) for k in keys) and contents(manifest) == contents(last)


def _damage_key(text: str) -> str:
    """One report per damaged snapshot, whichever path (listing or restore) finds it first."""
    found = re.search(r"\d{8}T\d{6}-\d{3}-[0-9a-f]{4}", text)
    return f"damaged:{found.group(0) if found else text}"


def _check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
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


def _check_tags(tags: Iterable[str]) -> list[str]:
    if isinstance(tags, str):
        tags = [tags]
    tags = list(tags)
    bad = [t for t in tags if not isinstance(t, str)]
    if bad:
        raise UsageError(f"tags must be text, not {type(bad[0]).__name__} ({bad[0]!r})")
    return sorted(set(tags))


def _check_lineage(lineage: str) -> str:
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


def _no_tensors(path: str, tensor: torch.Tensor) -> str:
    raise UsageError(f"{path}: a loop position must be plain numbers and text, not a tensor")


def load(location: str | os.PathLike[str] | Store, ref: str = "latest", *, run: str | None = None) -> Snapshot:
    """A snapshot from a folder or URL, by id, 'latest' or 'best:METRIC', to restore anywhere::

        snap = nbguard.load("checkpoints", "latest")
        snap.restore({"model": model, "opt": opt})
    """
    return Catalog(location).get(ref, run)
