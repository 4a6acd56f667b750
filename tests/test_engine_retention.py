"""Retention keeps the newest, the best and the pinned snapshots, and exactly the blobs they use;
gc sweeps every unused blob and the leftovers of gone writers; the catalog finds, pins, deletes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from nbguard import Catalog, Guard, LocalStore, MemoryStore, Policy, SnapshotError, UsageError
from nbguard.engine import leases
from nbguard.format.blobfile import BLOB_SUFFIX
from nbguard.format.manifest import encode_manifest, manifest_path, new_id
from nbguard.stores.owner import host_id

RUN = "ret"

pytestmark = pytest.mark.usefixtures("fixed_rng")



def blobs_on_disk(store) -> set[str]:
    return {f.path.rsplit("/", 1)[-1].removesuffix(BLOB_SUFFIX)
            for prefix in store.folders("blobs") for f in store.list(f"blobs/{prefix}")}


def blobs_of(catalog: Catalog) -> set[str]:
    return {s["blob"] for info in catalog.snapshots() for s in catalog.manifest(info.run, info.id)["storages"].values()}


def assert_exactly_referenced_blobs(store) -> None:
    catalog = Catalog(store)
    assert blobs_on_disk(store) == blobs_of(catalog)


class Frozen(nn.Module):
    """A big frozen part shared by every snapshot, and a small part that changes."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(64, 64).requires_grad_(False)
        self.head = nn.Linear(64, 2)


def saver(store, **kwargs):
    model = Frozen()
    guard = Guard(store, run=RUN, report=None, **kwargs)

    def save(**metrics):
        with torch.no_grad():
            model.head.weight.add_(1)
        return guard.save({"model": model}, metrics=metrics, wait=True).result()

    return guard, save


def test_keep_n_keeps_the_newest_and_exactly_their_blobs(tmp_path):
    store = LocalStore(tmp_path / "store")
    guard, save = saver(store, keep=3)
    infos = []
    for _ in range(6):
        infos.append(save())
        assert_exactly_referenced_blobs(store)
    assert [s.id for s in guard.snapshots()] == [i.id for i in reversed(infos[-3:])]
    files = sorted(p.relative_to(tmp_path / "store").as_posix() for p in (tmp_path / "store").rglob("*") if p.is_file())
    expected = sorted([f"blobs/{b[:2]}/{b}{BLOB_SUFFIX}" for b in blobs_of(guard.catalog)]
                      + [manifest_path(RUN, i.id) for i in infos[-3:]])
    assert files == expected
    assert guard.catalog.verify() == {}


@pytest.mark.parametrize("best", [("val_loss", "min"), "val_loss", "val_loss:min"])
def test_keep_best_keeps_the_best_by_a_metric(tmp_path, best):
    store = LocalStore(tmp_path / "store")
    guard, save = saver(store, keep=2, best=best, keep_best=2)
    infos = {loss: save(val_loss=loss) for loss in (5.0, 1.0, 4.0, 2.0, 6.0, 7.0)}
    kept = {s.metrics["val_loss"] for s in guard.snapshots()}
    assert kept == {1.0, 2.0, 6.0, 7.0}
    assert guard.catalog.find("best:val_loss", RUN).id == infos[1.0].id
    assert_exactly_referenced_blobs(store)


def test_keep_best_with_max(tmp_path):
    store = MemoryStore()
    guard, save = saver(store, keep=1, best=("acc", "max"), keep_best=1)
    for acc in (0.5, 0.9, 0.7, 0.6):
        save(acc=acc)
    assert sorted(s.metrics["acc"] for s in guard.snapshots()) == [0.6, 0.9]
    assert guard.catalog.find("best", RUN).metrics["acc"] == 0.9  # mode from the name: accuracy is maximised
    assert_exactly_referenced_blobs(store)


def test_pinned_snapshots_survive_until_unpinned(tmp_path):
    store = LocalStore(tmp_path / "store")
    guard, save = saver(store, keep=2)
    first = save()
    pinned = guard.catalog.pin(first.id, RUN)
    assert pinned.pinned and (tmp_path / "store" / "runs" / RUN / "pins" / first.id).exists()
    for _ in range(4):
        save()
    ids = [s.id for s in guard.snapshots()]
    assert first.id in ids and len(ids) == 3
    assert next(s for s in guard.snapshots() if s.id == first.id).pinned
    guard.catalog.unpin(first.id, RUN)
    save()
    assert first.id not in [s.id for s in guard.snapshots()]
    assert not (tmp_path / "store" / "runs" / RUN / "pins" / first.id).exists()
    assert_exactly_referenced_blobs(store)


def test_delete_removes_the_manifest_and_only_unshared_blobs(tmp_path):
    store = LocalStore(tmp_path / "store")
    guard, save = saver(store, keep=10)
    a, b, c = save(), save(), save()
    guard.catalog.pin(b.id, RUN)
    guard.catalog.delete(b.id, RUN)
    assert [s.id for s in guard.snapshots()] == [c.id, a.id]
    assert not (tmp_path / "store" / "runs" / RUN / "pins" / b.id).exists()
    assert_exactly_referenced_blobs(store)
    assert guard.catalog.verify() == {}
    fresh = Frozen()
    guard.restore({"model": fresh}, a.id)
    assert torch.equal(fresh.frozen.weight, guard.catalog.get(c.id, RUN).state_dict("model")["frozen.weight"])


def test_deleting_the_latest_snapshot_does_not_break_the_next_one(tmp_path):
    """The panel deletes the newest snapshot while training goes on: the next save must not refer to
    blobs that went with it."""
    store = LocalStore(tmp_path / "store")
    guard, save = saver(store, keep=3)
    save()
    guard.catalog.delete("latest", RUN)
    assert guard.snapshots() == []
    after = save()
    assert guard.catalog.verify() == {}, "the next snapshot refers to deleted blobs"
    fresh = Frozen()
    guard.restore({"model": fresh}, after.id)


def test_deleting_through_another_catalog_does_not_break_the_next_snapshot(tmp_path):
    store = LocalStore(tmp_path / "store")
    guard, save = saver(store, keep=3)
    save()
    Catalog(tmp_path / "store").delete("latest", RUN)  # e.g. `nbguard rm` from a terminal
    save()
    assert Catalog(tmp_path / "store").verify() == {}


def test_two_writers_keep_each_others_newest_snapshot(tmp_path):
    store_dir = tmp_path / "store"
    guard_a, save_a = saver(LocalStore(store_dir), keep=2)
    a0, a1 = save_a(), save_a()
    guard_b, save_b = saver(LocalStore(store_dir), keep=1)
    b1 = save_b()
    b2 = save_b()
    ids = {s.id for s in Catalog(store_dir).snapshots(RUN)}
    assert a1.id in ids, "the other writer's newest snapshot was deleted"
    assert b2.id in ids
    assert a0.id not in ids and b1.id not in ids
    assert_exactly_referenced_blobs(LocalStore(store_dir))
    assert Catalog(store_dir).verify() == {}


def test_a_writer_gone_for_more_than_an_hour_is_not_protected(tmp_path):
    store_dir = tmp_path / "store"
    guard, save = saver(LocalStore(store_dir), keep=1)
    template = save()
    # A snapshot by another writer, two hours old (its manifest copied and edited).
    path = store_dir / manifest_path(RUN, template.id)
    old = json.loads(path.read_bytes())
    old.update(id=new_id(time.time() - 7200), created=time.time() - 7200, writer="99999-deadbeef")
    (store_dir / manifest_path(RUN, old["id"])).write_bytes(encode_manifest(old))
    assert len(Catalog(store_dir).snapshots(RUN)) == 2
    newest = save()
    assert [s.id for s in Catalog(store_dir).snapshots(RUN)] == [newest.id]


def test_apply_retention_through_the_catalog(tmp_path):
    store = MemoryStore()
    guard, save = saver(store, keep=10)
    infos = [save() for _ in range(4)]
    catalog = Catalog(store)
    doomed = catalog.apply_retention(RUN, Policy(keep=1), protect=[infos[0].id])
    # The newest of this writer is protected anyway; the explicitly protected one stays too.
    assert {s.id for s in doomed} == {infos[1].id, infos[2].id}
    assert {s.id for s in catalog.snapshots(RUN)} == {infos[0].id, infos[3].id}
    assert_exactly_referenced_blobs(store)


@pytest.mark.parametrize("bad", [dict(keep=0), dict(keep=1.5), dict(best_mode="median"), dict(best_k=-1)])
def test_a_bad_policy_is_a_usage_error(bad):
    with pytest.raises(UsageError):
        Policy(**bad)


# -- gc ------------------------------------------------------------------------------------------------
def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def dead_pid() -> int:
    """The id of a process that has just ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_gc_removes_every_unused_blob_and_the_leftovers_of_gone_writers(tmp_path):
    store_dir = tmp_path / "store"
    guard, save = saver(LocalStore(store_dir), keep=3)
    save()
    info = save()
    referenced = blobs_of(guard.catalog)
    for blob in referenced:  # old blobs that are in use must survive whatever their age
        age(store_dir / "blobs" / blob[:2] / f"{blob}{BLOB_SUFFIX}", 10 * 3600)

    def plant(rel: str, seconds_old: float, size: int = 100) -> Path:
        path = store_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * size)
        age(path, seconds_old)
        return path

    here, gone, alive = host_id(), dead_pid(), os.getpid()
    old_orphan = plant(f"blobs/ab/{'ab' * 16}{BLOB_SUFFIX}", 7200, 300)
    young_orphan = plant(f"blobs/cd/{'cd' * 16}{BLOB_SUFFIX}", 1, 200)
    old_temp = plant(f"blobs/ab/.tmp-0123456789ab-{'ab' * 16}{BLOB_SUFFIX}", 7200, 50)  # an older nbguard's
    young_temp = plant(f"blobs/cd/.tmp-0123456789ab-{'cd' * 16}{BLOB_SUFFIX}", 60)
    dead_temp = plant(f"blobs/cd/.tmp-{here}-{gone}-0badc0de-blob", 1, 40)  # its writer has exited
    live_temp = plant(f"blobs/cd/.tmp-{here}-{alive}-0badc0de-blob", 7200)  # being written right now
    remote_temp = plant(f"blobs/cd/.tmp-ffffffff-{alive}-0badc0de-blob", 60)  # another machine's
    old_manifest_temp = plant(f"runs/{RUN}/snapshots/.tmp-0123456789ab-x.json", 7200, 7)

    report = Catalog(store_dir).gc()
    assert sorted(report.blobs) == sorted([f"blobs/ab/{'ab' * 16}{BLOB_SUFFIX}", f"blobs/cd/{'cd' * 16}{BLOB_SUFFIX}"])
    assert sorted(report.temp_files) == sorted(p.relative_to(store_dir).as_posix()
                                               for p in (old_temp, dead_temp, old_manifest_temp))
    assert report.freed == 300 + 200 + 50 + 40 + 7
    assert not old_orphan.exists() and not young_orphan.exists() and not dead_temp.exists()
    kept = dict(report.kept)
    assert "being written by process" in kept[live_temp.relative_to(store_dir).as_posix()]
    assert "younger than" in kept[young_temp.relative_to(store_dir).as_posix()]
    assert "younger than" in kept[remote_temp.relative_to(store_dir).as_posix()]
    assert blobs_of(guard.catalog) == referenced
    assert Catalog(store_dir).verify() == {}

    # --grace 0 removes what may be another machine's, never a write of a live process here.
    report = Catalog(store_dir).gc(grace=0)
    assert not young_temp.exists() and not remote_temp.exists() and live_temp.exists()
    assert blobs_on_disk(LocalStore(store_dir)) == referenced
    fresh = Frozen()
    guard.restore({"model": fresh}, info.id)


def test_gc_on_every_store(any_store):
    guard, save = saver(any_store, keep=5)
    save()
    orphan = f"blobs/ef/{'ef' * 16}{BLOB_SUFFIX}"
    claimed = f"blobs/12/{'12' * 16}{BLOB_SUFFIX}"
    any_store.write(orphan, [b"orphan"])
    any_store.write(claimed, [b"claimed"])
    leases.hold(any_store, "7-other", {"12" * 16})  # another writer's save in flight will use it
    report = Catalog(any_store).gc()
    assert report.blobs == [orphan]  # unused, however young: no save claims it
    assert dict(report.kept)[claimed] == "a save in flight by writer 7-other will use it"
    assert not any_store.exists(orphan) and any_store.exists(claimed)
    leases.release(any_store, "7-other")
    assert Catalog(any_store).gc().blobs == [claimed]
    assert Catalog(any_store).verify() == {}


def test_usage_counts_blobs_and_manifests(tmp_path):
    store_dir = tmp_path / "store"
    guard, save = saver(LocalStore(store_dir), keep=5)
    save()
    save()
    on_disk = sum(p.stat().st_size for p in store_dir.rglob("*") if p.is_file())
    assert guard.catalog.usage() == on_disk


# -- finding snapshots ---------------------------------------------------------------------------
def test_find_by_latest_id_prefix_and_best(tmp_path):
    store = MemoryStore()
    catalog = Catalog(store)
    with pytest.raises(SnapshotError, match="no snapshots"):
        catalog.find("latest", RUN)
    guard, save = saver(store, keep=10)
    a = save(loss=0.5)
    b = save(loss=0.7)
    assert catalog.find("latest", RUN).id == b.id
    assert catalog.find(a.id, RUN).id == a.id
    assert catalog.find("best:loss", RUN).id == a.id
    assert catalog.find("best:loss:max", RUN).id == b.id
    assert catalog.find("best", RUN).id == a.id
    with pytest.raises(SnapshotError):
        catalog.find("best:acc", RUN)
    with pytest.raises(SnapshotError, match="no snapshot"):
        catalog.find("20990101T000000-000-ffff", RUN)
    common = os.path.commonprefix([a.id, b.id])
    if common:
        with pytest.raises(UsageError, match="give more"):
            catalog.find(common, RUN)
    assert catalog.find(a.id[:len(common) + 1], RUN).id == a.id
    assert [r for r in catalog.runs()] == [RUN]


def test_catalog_events(tmp_path):
    store = MemoryStore(f"events-{uuid.uuid4().hex[:8]}")
    guard, save = saver(store, keep=1)
    events = []
    unsubscribe = guard.catalog.subscribe(lambda event, info: events.append((event, info.id if info else None)))
    a = save()
    b = save()
    guard.catalog.pin(b.id, RUN)
    guard.catalog.unpin(b.id, RUN)
    unsubscribe()
    save()
    assert sorted(events[:3]) == sorted([("saved", a.id), ("saved", b.id), ("deleted", a.id)])
    assert events.index(("saved", a.id)) < events.index(("deleted", a.id))
    assert events[3:] == [("pinned", b.id), ("unpinned", b.id)]


def test_a_broken_listener_does_not_break_saving(tmp_path):
    store = MemoryStore(f"broken-{uuid.uuid4().hex[:8]}")
    guard, save = saver(store)

    def broken(event, info):
        raise RuntimeError("listener bug")

    unsubscribe = guard.catalog.subscribe(broken)
    try:
        assert save().id == guard.latest().id
    finally:
        unsubscribe()
