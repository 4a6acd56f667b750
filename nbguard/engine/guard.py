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

import os
import platform
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..errors import (
    CorruptSnapshotError,
    NbguardError,
    SnapshotError,
    StaleCaptureError,
    StoreError,
    UsageError,
)
from ..format.codec import encode
from ..format.manifest import (
    FORMAT,
    VERSION,
    SnapshotInfo,
    check_run_name,
    encode_manifest,
    info_from,
    manifest_path,
    new_id,
)
from ..format.manifest import writer_id as new_writer_id
from ..stores import Store
from ..version import __version__
from .capture import capture
from .catalog import Catalog
from .report import ProgressFn, RestoreReport
from .retention import Policy
from .saving import (
    SaveStats,
    check_lineage,
    check_metrics,
    check_tags,
    default_lineage,
    no_tensors,
    release_lease,
    same_state,
    stale_message,
    write_under_lease,
)
from .snapshot import Snapshot
from .staging import StagedSnapshot, StagingArea
from .writer import SaveHandle, Writer

Reporter = Callable[[str], None]


def print_report(message: str) -> None:
    """The default reporter: one line on stderr."""
    print(f"nbguard: {message}", file=sys.stderr, flush=True)


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
        self.lineage = default_lineage() if lineage is None else check_lineage(lineage)
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
        metrics = check_metrics(metrics)
        tags = check_tags(tags)
        if note is not None and not isinstance(note, str):
            raise UsageError(f"note must be text, not {type(note).__name__}")
        for _ in range(3):  # a retake copies what went stale, so it cannot go stale the same way
            handle = self._save_once(state, metrics, position, note, tags, extra, unless_same)
            if not wait:
                return handle
            self._writer.flush()  # durable, and old snapshots cleaned up
            if not isinstance(handle.exception(timeout=0), StaleCaptureError):
                break
        return handle

    def prepare(self, state: Mapping[str, Any], *, wait: bool = False) -> None:
        """Get staging memory ready for ``state`` in the background (the first save then stalls no
        longer than a steady one); ``wait`` blocks until it is. The guarded run calls it as it starts."""
        with self._lock:
            self._writer.start()
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
                self.say_once(f"skip:{name}:{reason}", f"not saving {name}: {reason}")
            position_tree = encode(position, "position", no_tensors)
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
                raise StaleCaptureError(stale_message(stale))
            kept, items = self._staging.to_write(staged)
            entries, written = write_under_lease(self.store, self.writer_id, kept, items, published)
            manifest["storages"] = {
                g.key: {"blob": entries[g.key].blob, "entry": entries[g.key].entry,
                        "nbytes": entries[g.key].nbytes, "hash": entries[g.key].hash}
                for g in staged.groups
            }
            manifest["size"] = sum(e.nbytes for e in entries.values())
            manifest["written"] = written
            if unless_same and self.last_saved is not None and same_state(manifest, self._last_manifest):
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
                self.say_once(f"stale:{exc}", str(exc))
                self.retake_due = True
                if self.on_retake is not None:
                    self.on_retake()
                raise
            self.last_error = exc
            if isinstance(exc, Exception):
                self.say_once(f"store:{exc}", f"{exc}. Training goes on; earlier snapshots are intact and the next "
                                               "save tries again.")
            raise
        release_lease(self.store, self.writer_id)
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
            self.say_once(f"retention:{exc}", f"cleaning up old snapshots failed: {exc}")
        self.catalog.notify("saved", info)

    def _clean_up_failed(self, published: list[str]) -> None:
        """A failed save leaves no blob behind that nothing uses (a full disk must be able to recover)."""
        release_lease(self.store, self.writer_id)
        if published:
            try:
                self.catalog.collect(set(published))
            except NbguardError:
                pass

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

    def say_once(self, key: str, message: str) -> None:
        """Report ``message`` through this guard's reporter, once per ``key``."""
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
                self.say_once(_damage_key(path), f"{path} is damaged and is ignored: {problem}")
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
            return self._restore_newest_intact(state, namespace, rng)
        return self.restore_from(self.catalog.get(ref, self.run), state, namespace=namespace, rng=rng)

    def _restore_newest_intact(self, state: Mapping[str, Any] | None, namespace: MutableMapping[str, Any] | None,
                               rng: bool) -> RestoreReport:
        """``restore('latest')``: the newest snapshot whose bytes all check. Each is tried in turn,
        newest first; a restore that finds damage changes nothing, so checking the bytes as they are
        restored reads them once (``Catalog.latest_good`` checks them, and the restore then reads them
        again)."""
        skipped: list[str] = []
        for info in self.catalog.snapshots(self.run):
            try:
                report = self.restore_from(self.catalog.get(info.id, self.run), state, namespace=namespace, rng=rng)
            except (CorruptSnapshotError, StoreError) as exc:
                if getattr(exc, "partly_restored", False):
                    raise
                skipped.append(f"snapshot {info.id} is damaged or incomplete ({exc}); using an older one")
                continue
            for path, problem in self.catalog.problems.items():
                pid = path.rsplit("/", 1)[-1].removesuffix(".json")
                if f"runs/{self.run}/" in path and pid > info.id:
                    skipped.insert(0, f"snapshot {pid} cannot be read ({problem}); using an older one")
            for message in skipped:
                self.say_once(_damage_key(message), message)
            report.notes.extend(skipped)
            return report
        skipped += [f"{path}: {problem}" for path, problem in self.catalog.problems.items()]
        raise SnapshotError("no intact snapshot found" + (": " + "; ".join(skipped) if skipped else ""))

    def restore_from(
        self,
        snapshot: Snapshot,
        state: Mapping[str, Any] | None = None,
        *,
        namespace: MutableMapping[str, Any] | None = None,
        rng: bool = True,
        progress: ProgressFn | None = None,
    ) -> RestoreReport:
        """``snapshot.restore`` through this guard: its bytes are read into the staging memory the
        next save needs anyway, where it is ready, and that memory then changes places with the live
        tensors' (no copy into live memory, no memory beyond the guard's own)."""
        self.flush()  # the writer reads the staging buffers while a save is in flight
        report = snapshot.restore(state, namespace=namespace, rng=rng, progress=progress, staging=self._staging)
        self.parent = snapshot.id
        if state is not None:
            # What the restore created (an optimizer's state, which a new process does not have until
            # its first step) or read into live memory has no warm staging buffer yet: made ready now,
            # beside the training that follows, so the first save after a resume is not ~2x a steady one.
            try:
                with self._lock:
                    self._staging.prefault(capture(state, with_rng=False).tensors)
            except Exception:  # noqa: BLE001 - a warm-up: the restore is done, and the next save reports its own trouble
                pass
        return report


def _damage_key(text: str) -> str:
    """One report per damaged snapshot, whichever path (listing or restore) finds it first."""
    found = re.search(r"\d{8}T\d{6}-\d{3}-[0-9a-f]{4}", text)
    return f"damaged:{found.group(0) if found else text}"


def load(location: str | os.PathLike[str] | Store, ref: str = "latest", *, run: str | None = None) -> Snapshot:
    """A snapshot from a folder or URL, by id, 'latest' or 'best:METRIC', to restore anywhere::

        snap = nbguard.load("checkpoints", "latest")
        snap.restore({"model": model, "opt": opt})
    """
    return Catalog(location).get(ref, run)
