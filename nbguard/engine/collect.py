"""Collecting garbage: blobs no manifest and no save in flight names, stale leases, and leftovers of
interrupted writes. ``Catalog.collect``, ``Catalog.gc`` and ``Catalog.sweep`` are these functions."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import CorruptSnapshotError, NbguardError, StoreError
from ..format.blobfile import BLOB_SUFFIX
from ..format.manifest import is_snapshot_id
from ..stores import Store
from ..stores.base import FileInfo, ListsTempFiles, Renames
from ..stores.owner import host_id, temp_name, temp_owner, writer_gone
from . import leases

GRACE_SECONDS = 3600.0
GONE = "gone-"  # temporary names of blobs being deleted: .tmp-<host>-<pid>-<random>-gone-<blob file>
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


class ManifestSource(Protocol):
    """What collecting needs of a catalog: its store, its runs and their parsed manifests."""

    @property
    def store(self) -> Store: ...

    def runs(self) -> list[str]: ...

    def manifest(self, run: str, snapshot_id: str, *, size: int | None = None) -> dict[str, Any]: ...


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


def references(source: ManifestSource) -> tuple[set[str], dict[str, str], str | None]:
    """(blobs named by a manifest or a live lease, {blob: why it is kept} for leased ones, a reason
    to delete nothing when a manifest could not be read). Leases are read before manifests: a
    writer removes its lease only after committing its manifest, so one of the two is seen."""
    store = source.store
    found, _ = leases.read_all(store)
    used: set[str] = set()
    why: dict[str, str] = {}
    for lease in found:
        if lease.live():
            used |= lease.blobs
            why.update((b, f"a save in flight by writer {lease.writer} will use it") for b in lease.blobs)
    for run in source.runs():
        for f in store.list(f"runs/{run}/snapshots"):
            snapshot_id = f.path.rsplit("/", 1)[-1].removesuffix(".json")
            if not f.path.endswith(".json") or not is_snapshot_id(snapshot_id):
                continue
            try:
                manifest = source.manifest(run, snapshot_id, size=f.size)
            except CorruptSnapshotError:
                continue  # a damaged manifest cannot be restored from; its blobs are not kept for it
            except NbguardError as exc:
                if store.exists(f.path):
                    return used, why, f"{f.path} could not be read ({exc})"
                continue  # deleted meanwhile
            named = {s["blob"] for s in manifest["storages"].values()}
            used |= named
            for blob in named & why.keys():  # in a snapshot anyway: not kept for the lease alone
                del why[blob]
    return used, why, None


def _blob_files(store: Store, candidates: set[str] | None) -> dict[str, FileInfo]:
    """{blob name: FileInfo} of the blob files in the store (only ``candidates`` when given)."""
    prefixes = store.folders("blobs") if candidates is None else sorted({c[:2] for c in candidates})
    found = {}
    for prefix in prefixes:
        for f in store.list(f"blobs/{prefix}"):
            base = f.path.rsplit("/", 1)[-1]
            name = base.removesuffix(BLOB_SUFFIX)
            if base.endswith(BLOB_SUFFIX) and _HEX32.match(name) and name[:2] == prefix \
                    and (candidates is None or name in candidates):
                found[name] = f
    return found


def collect(source: ManifestSource, candidates: set[str] | None = None, report: GcReport | None = None) -> GcReport:
    """Delete the blobs (all, or only ``candidates``) that no manifest and no live lease names.

    Where the store can rename, each doomed blob is first moved aside under a temporary name,
    then the references are read again and a blob some writer claimed meanwhile is moved back:
    a save of another process racing this one never loses a blob. Other stores delete right
    after reading the references (see the README for that window)."""
    report = report or GcReport()
    store = source.store
    files = _blob_files(store, candidates)
    if not files:
        return report
    used, why, blocked = references(source)
    if blocked:
        report.kept.extend((f.path, f"nothing deleted: {blocked}") for n, f in files.items() if n not in used)
        return report
    report.kept.extend((f.path, why[n]) for n, f in files.items() if n in why)
    doomed = {n: f for n, f in files.items() if n not in used}
    if not isinstance(store, Renames):
        for f in doomed.values():
            store.delete(f.path)
            report.blobs.append(f.path)
            report.freed += f.size
        return report
    aside = {}
    for name, f in doomed.items():
        folder, base = f.path.rsplit("/", 1)
        spare = f"{folder}/{temp_name(GONE + base)}"
        try:
            store.rename(f.path, spare)
        except StoreError:
            continue  # removed meanwhile (another gc)
        aside[name] = (f, spare)
    if not aside:
        return report
    used, why, blocked = references(source)
    for name, (f, spare) in aside.items():
        if blocked or name in used:
            store.rename(spare, f.path)
            report.kept.append((f.path, why.get(name, f"nothing deleted: {blocked}" if blocked else
                                               "a snapshot committed meanwhile uses it")))
        else:
            store.delete(spare)
            report.blobs.append(f.path)
            report.freed += f.size
    return report


def gc(source: ManifestSource, grace: float = GRACE_SECONDS) -> GcReport:
    """Remove blobs that no manifest and no save in flight uses, stale leases, and leftovers of
    interrupted writes: at once when their writer is provably gone (a dead process on this
    machine), else when older than ``grace`` seconds. The report says what was kept and why."""
    store = source.store
    report = GcReport()
    now = time.time()
    found, problems = leases.read_all(store)
    for lease in found:
        if not lease.live(now):
            store.delete(lease.path)
            report.temp_files.append(lease.path)
    for path, problem in problems.items():
        report.kept.append((path, f"not a lease nbguard can read ({problem}); remove it by hand"))
    collect(source, None, report)
    if isinstance(store, ListsTempFiles):
        folders = ["blobs", *(f"blobs/{p}" for p in store.folders("blobs")), leases.FOLDER]
        for run in source.runs():
            folders += [f"runs/{run}/snapshots", f"runs/{run}/pins"]
        for folder in folders:
            for f in store.temp_files(folder):
                _sweep_temp(source, f, now, grace, report)
    return report


def _sweep_temp(source: ManifestSource, f: FileInfo, now: float, grace: float, report: GcReport) -> None:
    store = source.store
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
        if original.removesuffix(BLOB_SUFFIX) in references(source)[0] and not store.exists(target):
            if isinstance(store, Renames):
                store.rename(f.path, target)
            report.kept.append((target, "moved back: a snapshot uses it"))
            return
    store.delete(f.path)
    report.temp_files.append(f.path)
    report.freed += f.size
