"""The catalog: list, pick, pin and delete the snapshots of a store, and tell listeners about it.

This is all the panel and the CLI see of nbguard. Manifests are immutable, so each one is read
once and cached; pins are separate empty files, so pinning never rewrites a snapshot. Collecting
unused bytes is ``collect``'s job, comparing and exporting ``compare``'s; the catalog's methods
of those names call them.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from ..errors import CorruptSnapshotError, NbguardError, SnapshotError, StoreError, UsageError
from ..format.manifest import (
    MAX_MANIFEST_BYTES,
    SnapshotInfo,
    check_run_name,
    info_from,
    is_snapshot_id,
    manifest_path,
    parse_manifest,
    pin_path,
)
from ..stores import Store, open_store
from ..stores.base import Staged
from . import collect as collecting
from .collect import GRACE_SECONDS, GcReport
from .compare import Comparison, compare_snapshots, export_module
from .retention import Policy, best_of, to_delete
from .snapshot import Snapshot

Listener = Callable[[str, SnapshotInfo | None], None]
# Process-wide by design (docs/ARCHITECTURE.md): one list of listeners per store URL.
_LISTENERS: dict[str, list[Listener]] = {}
_LISTENERS_LOCK = threading.Lock()
MAX_CACHED_MANIFEST_BYTES = 64 * 1024 * 1024


def _listeners_of(url: str) -> list[Listener]:
    with _LISTENERS_LOCK:
        return _LISTENERS.setdefault(url, [])


class Catalog:
    """The snapshots of one store folder (every run in it)."""

    def __init__(self, store: Store | str | os.PathLike[str] | None = None):
        """``store``: a folder, a URL or a Store; None means this notebook's default folder."""
        if store is None:
            from ..stores.place import default_dir

            store = default_dir()
        self.store = open_store(store)
        self._cache: OrderedDict[str, tuple[int, dict[str, Any]]] = OrderedDict()
        self._cached_bytes = 0
        self._damaged: dict[str, tuple[int, str]] = {}
        self._lock = threading.RLock()
        # Listeners are shared by every Catalog of the same store in this process, so a panel
        # opened on a folder hears the saves of a Guard that writes there.
        self._listeners = _listeners_of(self.store.url)
        self.problems: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"Catalog({self.store.url!r})"

    # -- listening ---------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event, info)`` on 'saved', 'deleted', 'pinned', 'unpinned', 'state'.
        Events come from the writer thread: keep listeners cheap. Returns an unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def notify(self, event: str, info: SnapshotInfo | None) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, info)
            except Exception:  # a broken listener must never break a save
                pass

    # -- listing -----------------------------------------------------------------------------
    def runs(self) -> list[str]:
        return [r for r in self.store.folders("runs") if not r.startswith(".")]

    def manifest(self, run: str, snapshot_id: str, *, size: int | None = None) -> dict[str, Any]:
        """The parsed manifest of one snapshot (``size``: its file size from a listing, checked against
        the limit before anything is read)."""
        path = manifest_path(run, snapshot_id)
        with self._lock:
            cached = self._cache.get(path)
            if cached is not None:
                self._cache.move_to_end(path)
                return cached[1]
        if size is None:
            size = next((f.size for f in self.store.list(f"runs/{run}/snapshots") if f.path == path), None)
        if size is not None and size > MAX_MANIFEST_BYTES:
            raise CorruptSnapshotError(f"snapshot {snapshot_id}: the manifest is implausibly large ({size} bytes)")
        with self._lock:
            known = self._damaged.get(path)
        if known is not None and known[0] == size:
            raise CorruptSnapshotError(known[1])  # manifests never change: a damaged one is parsed once
        data = self.store.read(path)
        try:
            manifest = parse_manifest(data, where=f"snapshot {snapshot_id}")
            if manifest["id"] != snapshot_id or manifest["run"] != run:
                raise CorruptSnapshotError(f"snapshot {snapshot_id}: the manifest names another snapshot")
        except CorruptSnapshotError as exc:
            with self._lock:
                if len(self._damaged) > 10_000:
                    self._damaged.clear()
                self._damaged[path] = (len(data), str(exc))
            raise
        with self._lock:
            # Parsed manifests are kept (they never change), within a bound: a few huge ones must not
            # hold gigabytes of memory.
            self._cache[path] = (len(data), manifest)
            self._cached_bytes += len(data)
            while self._cached_bytes > MAX_CACHED_MANIFEST_BYTES and len(self._cache) > 1:
                self._forget(next(iter(self._cache)))
        return manifest

    def _forget(self, path: str) -> None:
        entry = self._cache.pop(path, None)
        if entry is not None:
            self._cached_bytes -= entry[0]

    def snapshots(self, run: str | None = None) -> list[SnapshotInfo]:
        """Snapshots newest first (of one run, or of every run). Damaged manifests are left out
        and described in ``problems``."""
        infos = []
        if run is None:
            self.problems = {}
        for name in [run] if run else self.runs():
            pinned = {f.path.rsplit("/", 1)[-1] for f in self.store.list(f"runs/{name}/pins")}
            for f in self.store.list(f"runs/{name}/snapshots"):
                snapshot_id = f.path.rsplit("/", 1)[-1].removesuffix(".json")
                if not f.path.endswith(".json") or not is_snapshot_id(snapshot_id):
                    continue
                try:
                    manifest = self.manifest(name, snapshot_id, size=f.size)
                    info = info_from(manifest, pinned=snapshot_id in pinned, state=self.state_of(f.path))
                except NbguardError as exc:
                    self.problems[f.path] = str(exc)
                    continue
                except (ValueError, TypeError, OverflowError) as exc:  # one odd file never hides the others
                    self.problems[f.path] = f"cannot be read: {exc}"
                    continue
                infos.append(info)
        infos.sort(key=lambda s: (s.created, s.id), reverse=True)
        return infos

    def state_of(self, path: str) -> str:
        """Where the file at ``path`` stands: 'local' for plain stores, else what a staged store says
        ('unknown' when it cannot tell)."""
        if isinstance(self.store, Staged):
            try:
                return self.store.state(path)
            except Exception:
                return "unknown"
        return "local"

    def find(self, ref: str = "latest", run: str | None = None) -> SnapshotInfo:
        """A snapshot by id, unique id prefix, 'latest', or 'best:METRIC[:min|max]'."""
        snapshots = self.snapshots(run)
        if not snapshots:
            where = f"run {run!r} of " if run else ""
            raise SnapshotError(f"no snapshots in {where}{self.store.url}: train with autosave first, or check the folder")
        if ref == "latest":
            return snapshots[0]
        if ref.startswith("best"):
            metric_spec = ref.partition(":")[2]
            if not metric_spec:
                metric_spec = next((m for s in snapshots for m in s.metrics), "")
                if not metric_spec:
                    raise SnapshotError("no snapshot has metrics, so none is 'best': save with metrics=...")
            metric, mode = Policy.parse_best(metric_spec)
            best = best_of(snapshots, metric, mode)
            if not best:
                raise SnapshotError(f"no snapshot has the metric {metric!r}")
            return best[0]
        matches = [s for s in snapshots if s.id == ref] or [s for s in snapshots if s.id.startswith(ref)]
        if not matches:
            raise SnapshotError(f"no snapshot {ref!r} in {self.store.url}: list them with `nbguard ls`")
        if len(matches) > 1:
            raise UsageError(f"{ref!r} matches {len(matches)} snapshots: give more of the id")
        return matches[0]

    def get(self, ref: str = "latest", run: str | None = None) -> Snapshot:
        """The snapshot itself (its tensors are read lazily, and verified when read)."""
        info = self.find(ref, run)
        return Snapshot(self.store, self.manifest(info.run, info.id), pinned=info.pinned, state=info.state)

    def latest_good(self, run: str | None = None, *, names: Iterable[str] | None = None,
                    lineage: str | None = None) -> tuple[Snapshot, list[str]]:
        """The newest snapshot whose bytes all verify, and a message for each newer one skipped;
        with ``lineage``, only snapshots of that lineage (``SnapshotInfo.lineage``) are considered."""
        skipped = []
        for info in self.snapshots(run):
            if lineage is not None and info.lineage != lineage:
                continue
            snapshot = Snapshot(self.store, self.manifest(info.run, info.id), pinned=info.pinned, state=info.state)
            try:
                snapshot._load(snapshot.storage_keys_of(names or snapshot.names) + snapshot._rng_storage_keys(True), None)
                for name in names or snapshot.names:
                    snapshot._decode(snapshot.tree(name)["tree"])  # checked, kept for the restore that follows
                snapshot._decode(snapshot.manifest["rng"])
                snapshot._decode(snapshot.manifest["extra"])
            except (CorruptSnapshotError, StoreError) as exc:
                skipped.append(f"snapshot {info.id} is damaged or incomplete ({exc}); using an older one")
                continue
            for path, problem in self.problems.items():
                pid = path.rsplit("/", 1)[-1].removesuffix(".json")
                if (run is None or f"runs/{run}/" in path) and pid > info.id:
                    skipped.insert(0, f"snapshot {pid} cannot be read ({problem}); using an older one")
            return snapshot, skipped
        for path, problem in self.problems.items():
            skipped.append(f"{path}: {problem}")
        raise SnapshotError("no intact snapshot found" + (": " + "; ".join(skipped) if skipped else ""))

    # -- changing ----------------------------------------------------------------------------
    def pin(self, ref: str, run: str | None = None) -> SnapshotInfo:
        """Pinned snapshots survive retention."""
        info = self.find(ref, run)
        self.store.write(pin_path(info.run, info.id), [b""])
        pinned = replace(info, pinned=True)
        self.notify("pinned", pinned)
        return pinned

    def unpin(self, ref: str, run: str | None = None) -> SnapshotInfo:
        info = self.find(ref, run)
        self.store.delete(pin_path(info.run, info.id))
        unpinned = replace(info, pinned=False)
        self.notify("unpinned", unpinned)
        return unpinned

    def delete(self, ref: str, run: str | None = None) -> SnapshotInfo:
        """Delete a snapshot (manifest first, then the blobs no other snapshot uses)."""
        info = self.find(ref, run)
        self._delete([info])
        return info

    def _delete(self, infos: list[SnapshotInfo]) -> GcReport:
        report = GcReport()
        if not infos:
            return report
        candidates: set[str] = set()
        for info in infos:
            try:
                candidates |= {s["blob"] for s in self.manifest(info.run, info.id)["storages"].values()}
            except NbguardError:
                pass
            self.store.delete(manifest_path(info.run, info.id))
            self.store.delete(pin_path(info.run, info.id))
            with self._lock:
                self._forget(manifest_path(info.run, info.id))
        self.collect(candidates, report)
        for info in infos:
            self.notify("deleted", info)
        return report

    def referenced_blobs(self) -> set[str]:
        """Blobs named by a readable manifest of any run (damaged manifests name none)."""
        return collecting.references(self)[0]

    def collect(self, candidates: set[str] | None = None, report: GcReport | None = None) -> GcReport:
        """Delete the blobs (all, or only ``candidates``) that no manifest and no live lease names
        (``collect.collect``: safe against a save of another process racing this one)."""
        return collecting.collect(self, candidates, report)

    def apply_retention(self, run: str, policy: Policy, *, protect: Iterable[str] = ()) -> list[SnapshotInfo]:
        """Delete what ``policy`` lets go in ``run``, and their blobs no other snapshot or save in
        flight uses; the newest snapshot of every other writer active in the last hour is kept too
        (another kernel may be building on it)."""
        check_run_name(run)
        snapshots = self.snapshots(run)
        recent: dict[str, SnapshotInfo] = {}
        for info in snapshots:
            if time.time() - info.created < GRACE_SECONDS and info.writer not in recent:
                recent[info.writer] = info
        doomed = to_delete(snapshots, policy, protect=[*protect, *(s.id for s in recent.values())])
        self._delete(doomed)
        return doomed

    def gc(self, grace: float = GRACE_SECONDS) -> GcReport:
        """Remove blobs that no manifest and no save in flight uses, stale leases, and leftovers of
        interrupted writes: at once when their writer is provably gone (a dead process on this
        machine), else when older than ``grace`` seconds. The report says what was kept and why."""
        return collecting.gc(self, grace)

    def sweep(self) -> GcReport:
        """What a writer does once when it starts: ``gc`` with the default grace."""
        return self.gc()

    def usage(self) -> int:
        """Bytes used by blobs and manifests in this store."""
        total = sum(f.size for p in self.store.folders("blobs") for f in self.store.list(f"blobs/{p}"))
        for run in self.runs():
            total += sum(f.size for f in self.store.list(f"runs/{run}/snapshots"))
        return total

    def verify(self, run: str | None = None) -> dict[str, str]:
        """Re-hash every snapshot; returns {snapshot id or file: what is wrong} (empty when all is well)."""
        broken = dict(self.problems)
        for info in self.snapshots(run):
            try:
                self.get(info.id, info.run).verify()
            except (NbguardError, OSError) as exc:
                broken[info.id] = str(exc)
        broken.update({k: v for k, v in self.problems.items() if k not in broken})
        return broken

    # -- looking inside ------------------------------------------------------------------------
    def compare(self, a: str, b: str, run: str | None = None) -> Comparison:
        """Metrics side by side, and which tensors changed and by how much."""
        return compare_snapshots(self.get(a, run), self.get(b, run))

    def export(self, ref: str, module: str, out: str | os.PathLike[str], run: str | None = None) -> str:
        """Write the weights of one module of a snapshot to a standalone ``.safetensors`` file
        (loadable with ``safetensors.torch.load_file`` or ``nbguard.load_weights``)."""
        return export_module(self.get(ref, run), module, out)
