"""The catalog: list, pick, pin, delete, compare, export and clean up the snapshots of a store.

This is all the panel and the CLI see of nbguard. Manifests are immutable, so each one is read
once and cached; pins are separate empty files, so pinning never rewrites a snapshot.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CorruptSnapshotError, NbguardError, SnapshotError, StoreError, UsageError
from ..format.blobfile import BLOB_SUFFIX
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
from ..stores.base import ListsTempFiles, Renames, Staged
from ..stores.owner import host_id, temp_name, temp_owner, writer_gone
from . import leases
from .retention import Policy, best_of, to_delete
from .snapshot import Snapshot
from .weights import write_safetensors

Listener = Callable[[str, SnapshotInfo | None], None]
_LISTENERS: dict[str, list[Listener]] = {}
_LISTENERS_LOCK = threading.Lock()


def _listeners_of(url: str) -> list[Listener]:
    with _LISTENERS_LOCK:
        return _LISTENERS.setdefault(url, [])
GRACE_SECONDS = 3600.0
GONE = "gone-"  # temporary names of blobs being deleted: .tmp-<host>-<pid>-<random>-gone-<blob file>
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
MAX_CACHED_MANIFEST_BYTES = 64 * 1024 * 1024


@dataclass
class Comparison:
    """Two snapshots side by side."""

    a: SnapshotInfo
    b: SnapshotInfo
    metrics: list[tuple[str, float | None, float | None]]
    changed: list[tuple[str, float, float]]  # (tensor, max |a-b|, relative change ||a-b|| / ||a||)
    unchanged: list[str]
    only_in_a: list[str]
    only_in_b: list[str]
    scalars: set[str] = field(default_factory=set)

    def describe(self) -> str:
        lines = [f"{self.a.id}  vs  {self.b.id}"]
        for name, x, y in self.metrics:
            lines.append(f"  {name}: {_num(x)} → {_num(y)}")
        lines.append(f"  tensors changed: {len(self.changed)}, unchanged: {len(self.unchanged)}")
        # Ranked by relative change, single numbers (step counters) left out of the top ten.
        ranked = [r for r in self.changed if r[0] not in self.scalars]
        for name, max_abs, rel in sorted(ranked, key=lambda r: -r[2])[:10]:
            lines.append(f"    {name}: max |Δ| {max_abs:.3g}, relative {rel:.3g}")
        return "\n".join(lines)


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.6g}"


@dataclass
class GcReport:
    """What ``gc`` removed, and what it kept and why."""

    blobs: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    freed: int = 0
    kept: list[tuple[str, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        """What ``nbguard gc`` and ``%nbguard gc`` print: the totals, then each unused file kept and why."""
        from ..humanize import printable, size

        head = (f"removed {len(self.blobs)} unused blob(s) and {len(self.temp_files)} leftover file(s), "
                f"{size(self.freed)} freed; kept {len(self.kept)} unused file(s)")
        return [head] + [f"  kept {printable(path)}: {printable(why)}" for path, why in self.kept]


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
                    info = info_from(manifest, pinned=snapshot_id in pinned, state=self._state(f.path))
                except NbguardError as exc:
                    self.problems[f.path] = str(exc)
                    continue
                except (ValueError, TypeError, OverflowError) as exc:  # one odd file never hides the others
                    self.problems[f.path] = f"cannot be read: {exc}"
                    continue
                infos.append(info)
        infos.sort(key=lambda s: (s.created, s.id), reverse=True)
        return infos

    def _state(self, path: str) -> str:
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
        pinned = _replace(info, pinned=True)
        self.notify("pinned", pinned)
        return pinned

    def unpin(self, ref: str, run: str | None = None) -> SnapshotInfo:
        info = self.find(ref, run)
        self.store.delete(pin_path(info.run, info.id))
        unpinned = _replace(info, pinned=False)
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
        return self._references()[0]

    def _references(self) -> tuple[set[str], dict[str, str], str | None]:
        """(blobs named by a manifest or a live lease, {blob: why it is kept} for leased ones, a reason
        to delete nothing when a manifest could not be read). Leases are read before manifests: a
        writer removes its lease only after committing its manifest, so one of the two is seen."""
        found, _ = leases.read_all(self.store)
        used: set[str] = set()
        why: dict[str, str] = {}
        for lease in found:
            if lease.live():
                used |= lease.blobs
                why.update((b, f"a save in flight by writer {lease.writer} will use it") for b in lease.blobs)
        for run in self.runs():
            for f in self.store.list(f"runs/{run}/snapshots"):
                snapshot_id = f.path.rsplit("/", 1)[-1].removesuffix(".json")
                if not f.path.endswith(".json") or not is_snapshot_id(snapshot_id):
                    continue
                try:
                    manifest = self.manifest(run, snapshot_id, size=f.size)
                except CorruptSnapshotError:
                    continue  # a damaged manifest cannot be restored from; its blobs are not kept for it
                except NbguardError as exc:
                    if self.store.exists(f.path):
                        return used, why, f"{f.path} could not be read ({exc})"
                    continue  # deleted meanwhile
                named = {s["blob"] for s in manifest["storages"].values()}
                used |= named
                for blob in named & why.keys():  # in a snapshot anyway: not kept for the lease alone
                    del why[blob]
        return used, why, None

    def _blob_files(self, candidates: set[str] | None) -> dict[str, Any]:
        """{blob name: FileInfo} of the blob files in the store (only ``candidates`` when given)."""
        prefixes = self.store.folders("blobs") if candidates is None else sorted({c[:2] for c in candidates})
        found = {}
        for prefix in prefixes:
            for f in self.store.list(f"blobs/{prefix}"):
                base = f.path.rsplit("/", 1)[-1]
                name = base.removesuffix(BLOB_SUFFIX)
                if base.endswith(BLOB_SUFFIX) and _HEX32.match(name) and name[:2] == prefix \
                        and (candidates is None or name in candidates):
                    found[name] = f
        return found

    def collect(self, candidates: set[str] | None = None, report: GcReport | None = None) -> GcReport:
        """Delete the blobs (all, or only ``candidates``) that no manifest and no live lease names.

        Where the store can rename, each doomed blob is first moved aside under a temporary name,
        then the references are read again and a blob some writer claimed meanwhile is moved back:
        a save of another process racing this one never loses a blob. Other stores delete right
        after reading the references (see the README for that window)."""
        report = report or GcReport()
        files = self._blob_files(candidates)
        if not files:
            return report
        used, why, blocked = self._references()
        if blocked:
            report.kept.extend((f.path, f"nothing deleted: {blocked}") for n, f in files.items() if n not in used)
            return report
        report.kept.extend((f.path, why[n]) for n, f in files.items() if n in why)
        doomed = {n: f for n, f in files.items() if n not in used}
        if not isinstance(self.store, Renames):
            for f in doomed.values():
                self.store.delete(f.path)
                report.blobs.append(f.path)
                report.freed += f.size
            return report
        rename = self.store.rename
        aside = {}
        for name, f in doomed.items():
            folder, base = f.path.rsplit("/", 1)
            spare = f"{folder}/{temp_name(GONE + base)}"
            try:
                rename(f.path, spare)
            except StoreError:
                continue  # removed meanwhile (another gc)
            aside[name] = (f, spare)
        if not aside:
            return report
        used, why, blocked = self._references()
        for name, (f, spare) in aside.items():
            if blocked or name in used:
                rename(spare, f.path)
                report.kept.append((f.path, why.get(name, f"nothing deleted: {blocked}" if blocked else
                                                   "a snapshot committed meanwhile uses it")))
            else:
                self.store.delete(spare)
                report.blobs.append(f.path)
                report.freed += f.size
        return report

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
        report = GcReport()
        now = time.time()
        found, problems = leases.read_all(self.store)
        for lease in found:
            if not lease.live(now):
                self.store.delete(lease.path)
                report.temp_files.append(lease.path)
        for path, problem in problems.items():
            report.kept.append((path, f"not a lease nbguard can read ({problem}); remove it by hand"))
        self.collect(None, report)
        if isinstance(self.store, ListsTempFiles):
            folders = ["blobs", *(f"blobs/{p}" for p in self.store.folders("blobs")), leases.FOLDER]
            for run in self.runs():
                folders += [f"runs/{run}/snapshots", f"runs/{run}/pins"]
            for folder in folders:
                for f in self.store.temp_files(folder):
                    self._sweep_temp(f, now, grace, report)
        return report

    def _sweep_temp(self, f: Any, now: float, grace: float, report: GcReport) -> None:
        name = f.path.rsplit("/", 1)[-1]
        owner = temp_owner(name)
        gone = owner is not None and writer_gone(*owner)
        if not gone:
            if owner is not None and owner[0] == host_id():
                if now - f.mtime < leases.LEASE_SECONDS:
                    report.kept.append((f.path, f"being written by process {owner[1]} on this machine"))
                    return
            elif now - f.mtime < grace:
                report.kept.append((f.path, f"a write in progress elsewhere? younger than {grace:g} s"))
                return
        original = name.split("-", 4)[-1].removeprefix(GONE) if owner and GONE in name else None
        if original is not None and "/" in f.path:
            # A blob moved aside by a deleter that died before deciding: put it back if still used.
            target = f"{f.path.rsplit('/', 1)[0]}/{original}"
            if original.removesuffix(BLOB_SUFFIX) in self.referenced_blobs() and not self.store.exists(target):
                if isinstance(self.store, Renames):
                    self.store.rename(f.path, target)
                report.kept.append((target, "moved back: a snapshot uses it"))
                return
        self.store.delete(f.path)
        report.temp_files.append(f.path)
        report.freed += f.size

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
        first, second = self.get(a, run), self.get(b, run)
        names = sorted(set(first.info.metrics) | set(second.info.metrics))
        metrics = [(n, first.info.metrics.get(n), second.info.metrics.get(n)) for n in names]
        keys_a, keys_b = set(first.manifest["tensors"]), set(second.manifest["tensors"])
        changed, unchanged, scalars = [], [], set()
        for key in sorted(keys_a & keys_b):
            if key.startswith("rng/"):
                continue
            x, y = first.tensor(key), second.tensor(key)
            if first.manifest["tensors"][key] == second.manifest["tensors"][key] and \
                    first.manifest["storages"][first.manifest["tensors"][key]["storage"]]["hash"] == \
                    second.manifest["storages"][second.manifest["tensors"][key]["storage"]]["hash"]:
                unchanged.append(key)
                continue
            if x.shape != y.shape or x.dtype != y.dtype:
                changed.append((key, math.inf, math.inf))
                continue
            if torch.equal(x, y):
                unchanged.append(key)
                continue
            if x.numel() <= 1:
                scalars.add(key)
            diff = x.double() - y.double()
            norm = float(x.double().norm())
            changed.append((key, float(diff.abs().max()), float(diff.norm()) / norm if norm else math.inf))
        return Comparison(first.info, second.info, metrics, changed, unchanged,
                          sorted(k for k in keys_a - keys_b if not k.startswith("rng/")),
                          sorted(k for k in keys_b - keys_a if not k.startswith("rng/")), scalars)

    def export(self, ref: str, module: str, out: str | os.PathLike[str], run: str | None = None) -> str:
        """Write the weights of one module of a snapshot to a standalone ``.safetensors`` file
        (loadable with ``safetensors.torch.load_file`` or ``nbguard.load_weights``)."""
        snapshot = self.get(ref, run)
        if module not in snapshot.names:
            raise UsageError(f"snapshot {snapshot.id} has no {module!r}; it has: {', '.join(snapshot.names)}")
        state = snapshot.state_dict(module)
        if not isinstance(state, dict):
            raise UsageError(f"{module!r} in snapshot {snapshot.id} is not a module's state_dict")
        tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise UsageError(f"{module!r} in snapshot {snapshot.id} holds no tensors to export")
        return write_safetensors(tensors, out, {"nbguard.snapshot": snapshot.id, "nbguard.module": module})


def _replace(info: SnapshotInfo, **changes: Any) -> SnapshotInfo:
    from dataclasses import replace

    return replace(info, **changes)
