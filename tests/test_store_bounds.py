"""A store stays bounded at any save cadence, never reaches outside itself, and one odd file never
hides or breaks the others (issue 14: items 1, 2 and the store parts of 4)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from nbguard import Catalog, Guard, LocalStore, UsageError
from nbguard.cli import main as cli
from nbguard.engine import catalog as catalog_module
from nbguard.engine import leases
from nbguard.errors import NbguardError, StoreError
from nbguard.format.blobfile import BLOB_SUFFIX, blob_path
from nbguard.format.manifest import (
    MAX_ENTRIES,
    check_run_name,
    encode_manifest,
    manifest_path,
    new_id,
    parse_manifest,
)
from nbguard.stores.owner import host_id

RUN = "bounds"

pytestmark = pytest.mark.usefixtures("fixed_rng")


def blobs_on_disk(root: Path) -> dict[str, int]:
    return {p.name.removesuffix(BLOB_SUFFIX): p.stat().st_size for p in (root / "blobs").glob(f"*/*{BLOB_SUFFIX}")}


def referenced(root: Path) -> set[str]:
    catalog = Catalog(LocalStore(root))
    return {s["blob"] for i in catalog.snapshots() for s in catalog.manifest(i.run, i.id)["storages"].values()}


def all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def changing_saver(store, **kwargs):
    """A model whose every weight changes before each save: every save writes a new blob."""
    model = nn.Linear(128, 128)
    guard = Guard(store, run=RUN, report=kwargs.pop("report", None), **kwargs)

    def save(**options):
        with torch.no_grad():
            model.weight.add_(1)
        return guard.save({"model": model}, **options)

    return guard, save


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- 1. bounded at any cadence ---------------------------------------------------------------------------
def test_saving_at_every_iteration_keeps_only_the_kept_snapshots_bytes(tmp_path):
    root = tmp_path / "store"
    guard, save = changing_saver(LocalStore(root), keep=2)
    one_snapshot = None
    for _ in range(30):
        save(wait=True).result()
        on_disk = blobs_on_disk(root)
        one_snapshot = one_snapshot or sum(on_disk.values())
        assert set(on_disk) == referenced(root), "a blob no snapshot uses stayed on disk"
        # Two kept snapshots, plus the first blob while it holds the bias that never changes.
        assert sum(on_disk.values()) <= 3 * one_snapshot
    assert len(guard.snapshots()) == 2
    assert not [f for f in all_files(root) if "/.tmp-" in f or f.startswith("leases/")]


def test_a_save_in_flight_in_another_kernel_keeps_its_blobs(tmp_path):
    root = tmp_path / "store"
    cleaned = []

    def other_kernel_cleans_up(kind: str, path: str) -> None:
        # Kernel A has written its blob and is about to commit the manifest: kernel B cleans up now.
        if kind == "create" and path.startswith(f"runs/{RUN}/snapshots/") and not cleaned:
            cleaned.append(Catalog(LocalStore(root)).gc(grace=0))

    guard, save = changing_saver(LocalStore(root, on_event=other_kernel_cleans_up))
    info = save(wait=True).result()
    assert cleaned and cleaned[0].blobs == []
    assert any("a save in flight by writer" in why for _, why in cleaned[0].kept)
    assert Catalog(LocalStore(root)).verify() == {}, "the other kernel deleted a blob of a save in flight"
    assert [s.id for s in Catalog(LocalStore(root)).snapshots(RUN)] == [info.id]


def test_a_blob_claimed_while_it_is_being_deleted_is_put_back(tmp_path):
    root = tmp_path / "store"
    blob = "ab" * 16
    LocalStore(root).write(blob_path(blob), [b"bytes another kernel is about to reference"])

    def claimed_meanwhile(kind: str, path: str) -> None:
        # Between gc's reading of the references and its delete, another writer claims the blob.
        if kind == "rename" and path == blob_path(blob):
            leases.hold(LocalStore(root), "4242-other", {blob})

    report = Catalog(LocalStore(root, on_event=claimed_meanwhile)).gc(grace=0)
    assert report.blobs == []
    assert (root / blob_path(blob)).read_bytes() == b"bytes another kernel is about to reference"
    assert dict(report.kept)[blob_path(blob)] == "a save in flight by writer 4242-other will use it"
    assert not [f for f in all_files(root) if ".tmp-" in f]


def test_a_failed_save_leaves_no_unused_blob_so_a_full_disk_recovers(tmp_path, reports):
    root = tmp_path / "store"
    full = {"on": False}

    def disk(kind: str, path: str) -> None:
        if full["on"] and kind == "write" and path.startswith("runs/"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # the blob fitted, the manifest not

    guard, save = changing_saver(LocalStore(root, on_event=disk), report=reports.append, keep=1)
    save(wait=True).result()
    full["on"] = True
    for _ in range(3):
        assert save(wait=True).exception() is not None
        assert set(blobs_on_disk(root)) == referenced(root), "a failed save left its blob behind"
    assert sum("disk is full" in r for r in reports) == 1
    full["on"] = False
    save(wait=True).result()
    assert reports[-1] == "saving works again"
    assert set(blobs_on_disk(root)) == referenced(root)


def test_what_a_killed_writer_left_goes_with_the_next_writers_first_save(tmp_path):
    root = tmp_path / "store"
    gone = dead_pid()
    orphan = "cd" * 16
    (root / "blobs" / "cd").mkdir(parents=True)
    (root / blob_path(orphan)).write_bytes(b"written, never committed")
    leftover = root / "blobs" / "cd" / f".tmp-{host_id()}-{gone}-0badc0de-blob"
    leftover.write_bytes(b"\0" * 1000)  # just written: age says nothing, the dead process does
    lease = {"writer": f"{gone}-dead", "host": host_id(), "pid": gone, "refreshed": 1e10, "blobs": [orphan]}
    (root / "leases").mkdir()
    (root / "leases" / f"{gone}-dead.json").write_text(json.dumps(lease))
    guard, save = changing_saver(LocalStore(root))
    save(wait=True).result()
    assert not leftover.exists() and not (root / blob_path(orphan)).exists()
    assert not (root / "leases" / f"{gone}-dead.json").exists()
    assert set(blobs_on_disk(root)) == referenced(root)


def test_gc_beside_a_saving_writer_never_breaks_either(tmp_path, reports):
    root = tmp_path / "store"
    guard, save = changing_saver(LocalStore(root), report=reports.append, keep=2)
    save(wait=True).result()
    done, errors = threading.Event(), []

    def collect() -> None:
        while not done.is_set():
            try:
                Catalog(LocalStore(root)).gc(grace=0)
            except Exception as exc:  # noqa: BLE001 - any error of gc is the failure looked for
                errors.append(exc)

    thread = threading.Thread(target=collect)
    thread.start()
    try:
        handles = [save(wait=True) for _ in range(40)]
    finally:
        done.set()
        thread.join()
    assert errors == []
    assert [h.exception() for h in handles] == [None] * 40, reports
    assert reports == []
    assert Catalog(LocalStore(root)).verify() == {}


def test_cli_gc_says_what_it_kept_and_why(tmp_path, capsys):
    root = tmp_path / "store"
    guard, save = changing_saver(LocalStore(root))
    save(wait=True).result()
    live = root / "blobs" / f".tmp-{host_id()}-{os.getpid()}-0badc0de-blob"
    live.write_bytes(b"a write in progress")
    assert cli(["gc", str(root), "--grace", "0"]) == 0
    out = capsys.readouterr().out
    assert "kept 1 unused file(s)" in out
    assert f"kept blobs/{live.name}: being written by process {os.getpid()} on this machine" in out
    assert live.exists()


# -- 2. never through a link, never into a special file ---------------------------------------------------
def test_gc_refuses_a_blobs_folder_that_links_outside_the_store(tmp_path, capsys):
    root, outside = tmp_path / "store", tmp_path / "Documents"
    guard, save = changing_saver(LocalStore(root))
    save(wait=True).result()
    (root / "blobs").rename(outside)
    (outside / "ab").mkdir()
    (outside / "ab" / "thesis.docx").write_bytes(b"years of work")
    (root / "blobs").symlink_to(outside)
    with pytest.raises(StoreError, match="symbolic link blobs inside the store"):
        Catalog(LocalStore(root)).gc(grace=0)
    assert cli(["gc", str(root), "--grace", "0"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert (outside / "ab" / "thesis.docx").read_bytes() == b"years of work"


def test_saves_and_retention_refuse_a_snapshots_folder_that_links_outside(tmp_path, reports):
    root, outside = tmp_path / "store", tmp_path / "elsewhere"
    guard, save = changing_saver(LocalStore(root), report=reports.append, keep=1)
    save(wait=True).result()
    (root / "runs" / RUN / "snapshots").rename(outside)
    (root / "runs" / RUN / "snapshots").symlink_to(outside)
    (outside / f"{new_id()}.json").write_bytes(b"someone else's file")
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    for _ in range(3):
        assert isinstance(save(wait=True).exception(), StoreError)
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before, "the store wrote or deleted outside itself"
    assert sum("symbolic link" in r for r in reports) == 1


def _within(seconds: float, job):
    """Run ``job`` in a thread; fail (instead of hanging the test run) if it has not returned in time."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = job()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "hangs on a FIFO"
    return out


def test_a_fifo_in_place_of_a_blob_is_an_error_not_a_hang(tmp_path):
    root = tmp_path / "store"
    model = nn.Linear(4, 4)
    guard = Guard(LocalStore(root), run=RUN, report=None)
    guard.save({"model": model}, wait=True).result()
    blob = next((root / "blobs").glob(f"*/*{BLOB_SUFFIX}"))
    blob.unlink()
    os.mkfifo(blob)
    verified = _within(120, lambda: Catalog(LocalStore(root)).verify())
    assert "not a regular file" in " ".join(verified["value"].values())
    restored = _within(120, lambda: Guard(LocalStore(root), run=RUN, report=None).restore({"model": nn.Linear(4, 4)}))
    assert isinstance(restored.get("error"), NbguardError)
    assert "not a regular file" in str(restored["error"])


# -- 4. odd values: stored faithfully or refused at save time; one bad file hides nothing ---------------
def test_extreme_metrics_are_stored_faithfully_and_unstorable_values_refused(tmp_path):
    guard = Guard(LocalStore(tmp_path / "store"), run=RUN, report=None)
    state = {"model": nn.Linear(2, 2)}
    info = guard.save(state, metrics={"best": -sys.float_info.max, "big": 1e300, "n": 10**18}, wait=True).result()
    assert Catalog(tmp_path / "store").find(info.id).metrics == {"best": -sys.float_info.max, "big": 1e300, "n": 10**18}
    for bad in ({"huge": 10**400}, {5: 1.0}, {"flag": "yes"}):
        with pytest.raises(UsageError):
            guard.save(state, metrics=bad)
    with pytest.raises(UsageError, match="tags must be text"):
        guard.save(state, tags=["ok", 3])
    with pytest.raises(UsageError, match="note must be text"):
        guard.save(state, note=b"bytes")
    assert len(Catalog(tmp_path / "store").snapshots(RUN)) == 1 and not Catalog(tmp_path / "store").problems


def forged(root: Path, template_id: str, **changes) -> str:
    """A copy of a manifest with ``changes``, under a new id, with a valid checksum."""
    manifest = json.loads((root / manifest_path(RUN, template_id)).read_bytes())
    manifest.pop("checksum")
    manifest.update(id=new_id(), **changes)
    (root / manifest_path(RUN, manifest["id"])).write_bytes(encode_manifest(manifest))
    return manifest["id"]


def test_a_manifest_from_the_year_3_million_hides_no_other_snapshot(tmp_path, capsys):
    root = tmp_path / "store"
    guard, save = changing_saver(LocalStore(root), keep=5)
    good = [save(wait=True).result() for _ in range(2)]
    bad = forged(root, good[0].id, created=1e14)
    catalog = Catalog(LocalStore(root))
    assert [s.id for s in catalog.snapshots(RUN)] == [g.id for g in reversed(good)]
    assert "invalid creation time" in catalog.problems[manifest_path(RUN, bad)]
    assert cli(["ls", str(root)]) == 0
    out = capsys.readouterr().out
    assert good[0].id in out and good[1].id in out and f"damaged: {manifest_path(RUN, bad)}" in out
    assert cli(["show", good[0].id, "--dir", str(root)]) == 0


class CountingReads(LocalStore):
    def __init__(self, root):
        super().__init__(root)
        self.reads: list[str] = []

    def read(self, path):
        self.reads.append(path)
        return super().read(path)


def test_an_oversized_manifest_is_refused_before_it_is_read(tmp_path):
    root = tmp_path / "store"
    guard, save = changing_saver(LocalStore(root))
    good = save(wait=True).result()
    huge = root / manifest_path(RUN, new_id())
    with open(huge, "wb") as f:
        f.truncate(3 * 1024**3)  # sparse: 3 GiB that cost no disk
    store = CountingReads(root)
    catalog = Catalog(store)
    assert [s.id for s in catalog.snapshots(RUN)] == [good.id]
    assert "implausibly large" in catalog.problems[huge.relative_to(root).as_posix()]
    assert huge.relative_to(root).as_posix() not in store.reads


def test_parsed_manifests_are_cached_within_a_bound(tmp_path, monkeypatch):
    root = tmp_path / "store"
    guard, save = changing_saver(LocalStore(root), keep=6)
    infos = [save(wait=True).result() for _ in range(6)]
    size = (root / manifest_path(RUN, infos[0].id)).stat().st_size
    monkeypatch.setattr(catalog_module, "MAX_CACHED_MANIFEST_BYTES", 2 * size + size // 2)
    catalog = Catalog(LocalStore(root))
    assert len(catalog.snapshots(RUN)) == 6
    assert catalog._cached_bytes <= 3 * size and len(catalog._cache) <= 3
    assert catalog.verify(RUN) == {}


def test_a_manifest_with_too_many_entries_is_refused_before_it_is_checked(tmp_path):
    root = tmp_path / "store"
    guard, save = changing_saver(LocalStore(root))
    info = save(wait=True).result()
    manifest = json.loads((root / manifest_path(RUN, info.id)).read_bytes())
    manifest.pop("checksum")
    layout = next(iter(manifest["tensors"].values()))
    manifest["tensors"] = {f"t{i}": layout for i in range(MAX_ENTRIES + 1)}
    with pytest.raises(NbguardError, match=f"more than {MAX_ENTRIES} entries"):
        parse_manifest(encode_manifest(manifest))


def test_a_manifest_with_a_million_entries_is_refused_without_parsing_it(tmp_path):
    root = tmp_path / "store"
    guard, save = changing_saver(LocalStore(root))
    info = save(wait=True).result()
    manifest = json.loads((root / manifest_path(RUN, info.id)).read_bytes())
    manifest.pop("checksum")
    layout = next(iter(manifest["tensors"].values()))
    manifest["tensors"] = {f"t{i}": layout for i in range(10**6)}
    bad = forged(root, info.id, tensors=manifest["tensors"])
    catalog = Catalog(LocalStore(root))
    assert [s.id for s in catalog.snapshots(RUN)] == [info.id]
    assert "implausibly many entries" in catalog.problems[manifest_path(RUN, bad)]


@pytest.mark.parametrize("name", ["run\n", "run\r\n", "ok\nrm"])
def test_a_run_name_ending_in_a_newline_is_refused(name):
    with pytest.raises(UsageError, match="invalid run name"):
        check_run_name(name)


def test_ls_and_show_print_terminal_codes_in_names_and_notes_escaped(tmp_path, capsys):
    root = tmp_path / "store"
    guard, save = changing_saver(LocalStore(root))
    forged_line = "\x1b[2K\r20990101T000000-000-beef  other  1999-01-01"
    info = save(metrics={f"loss{forged_line}": 1.0}, note=f"fine\n{forged_line}", tags=["\x1b]0;title\x07"],
                wait=True).result()
    assert cli(["ls", str(root)]) == 0
    assert cli(["show", info.id, "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert not any(line.startswith("20990101T") for line in out.splitlines())
    assert "\\x1b[2K" in out


def test_snapshots_say_which_writer_and_lineage_they_come_from(tmp_path):
    root = tmp_path / "store"
    a = Guard(LocalStore(root), run=RUN, report=None, lineage="kernel-a")
    b = Guard(LocalStore(root), run=RUN, report=None, lineage="kernel-b")
    model = nn.Linear(2, 2)
    a1 = a.save({"model": model}, wait=True).result()
    b1 = b.save({"model": model}, wait=True).result()
    a2 = a.save({"model": model}, wait=True).result()
    listed = {s.id: s for s in Catalog(LocalStore(root)).snapshots(RUN)}
    assert (listed[a1.id].writer, listed[a1.id].lineage, listed[a1.id].parent) == (a.writer_id, "kernel-a", None)
    assert (listed[a2.id].lineage, listed[a2.id].parent) == ("kernel-a", a1.id)
    assert (listed[b1.id].writer, listed[b1.id].lineage) == (b.writer_id, "kernel-b")
    catalog = Catalog(LocalStore(root))
    assert catalog.latest_good(RUN)[0].id == a2.id
    assert catalog.latest_good(RUN, lineage="kernel-b")[0].id == b1.id
    resumed = Guard(LocalStore(root), run=RUN, report=None, lineage="kernel-b")
    resumed.restore({"model": nn.Linear(2, 2)}, b1.id)
    assert resumed.save({"model": model}, wait=True).result().parent == b1.id
    with pytest.raises(UsageError):
        Guard(LocalStore(root), run=RUN, report=None, lineage="")


def test_a_resume_says_so_when_two_kernels_saved_one_run_at_the_same_time(tmp_path):
    """The issue's probe: two kernels of one notebook in one folder, both killed, then resumed. The
    resume takes the newest snapshot and says whose it is, and how to take the other one."""
    from nbguard.training.resume_choice import CodeVersion, choose

    root = tmp_path / "store"
    a = Guard(LocalStore(root), run=RUN, report=None)
    b = Guard(LocalStore(root), run=RUN, report=None)
    model = nn.Linear(2, 2)
    extra = {"fingerprint": "f", "structure": "s"}
    a.save({"model": model}, extra=extra, wait=True)
    b.save({"model": model}, extra=extra, wait=True)
    a2 = a.save({"model": model}, extra=extra, wait=True).result()
    b2 = b.save({"model": model}, extra=extra, wait=True).result()
    choice = choose(Catalog(LocalStore(root)), RUN, code=CodeVersion("f", "s"))
    assert choice.snapshot.id == b2.id
    (note,) = [n for n in choice.notes if "two writers" in n]
    assert b.writer_id in note and a2.id in note and f"--resume-from {a2.id}" in note

    # One kernel after another (the second resumed from the first): nothing to say.
    solo = tmp_path / "solo"
    first = Guard(LocalStore(solo), run=RUN, report=None)
    s1 = first.save({"model": model}, extra=extra, wait=True).result()
    second = Guard(LocalStore(solo), run=RUN, report=None)
    second.restore({"model": nn.Linear(2, 2)}, s1.id)
    second.save({"model": model}, extra=extra, wait=True)
    assert not [n for n in choose(Catalog(LocalStore(solo)), RUN, code=CodeVersion("f", "s")).notes
                if "two writers" in n]


def test_the_panel_shows_a_folder_with_a_sentinel_metric_and_a_forged_date(tmp_path):
    import nbguard

    root = tmp_path / "store"
    guard, save = changing_saver(LocalStore(root), keep=5)
    good = [save(metrics={"best": -sys.float_info.max}, wait=True).result(),
            save(metrics={"best": sys.float_info.max}, wait=True).result(),
            save(metrics={"best": 0.5}, wait=True).result()]
    forged(root, good[0].id, created=1e14)
    panel = nbguard.panel(str(root), namespace={})
    assert sorted(r.id for r in panel.rows) == sorted(g.id for g in good)
    assert "<svg" in panel.chart.value


def test_a_temporary_file_removed_under_a_save_is_reported_as_such_not_as_a_vanished_folder(tmp_path, reports):
    root = tmp_path / "store"

    def removed_by_someone(kind: str, path: str) -> None:
        if kind == "rename" and path.startswith("runs/"):  # e.g. `gc --grace 0` from another machine
            for leftover in (root / "runs" / RUN / "snapshots").glob(".tmp-*"):
                leftover.unlink()

    guard, save = changing_saver(LocalStore(root, on_event=removed_by_someone), report=reports.append)
    error = save(wait=True).exception()
    assert isinstance(error, StoreError) and "removed by another process" in str(error)
    assert "disappeared" not in reports[0]


def test_a_blob_moved_aside_by_a_deleter_that_died_is_put_back_if_a_snapshot_uses_it(tmp_path):
    root = tmp_path / "store"
    guard, save = changing_saver(LocalStore(root))
    save(wait=True).result()
    blob = next((root / "blobs").glob(f"*/*{BLOB_SUFFIX}"))
    aside = blob.with_name(f".tmp-{host_id()}-{dead_pid()}-0badc0de-gone-{blob.name}")
    blob.rename(aside)  # killed between moving it aside and reading the references again
    assert Catalog(LocalStore(root)).verify() != {}
    report = Catalog(LocalStore(root)).gc()
    assert blob.exists() and not aside.exists()
    assert (blob.relative_to(root).as_posix(), "moved back: a snapshot uses it") in report.kept
    assert Catalog(LocalStore(root)).verify() == {}


def test_gc_on_an_fsspec_store_removes_the_leftovers_of_gone_writers_only():
    from uuid import uuid4

    from nbguard.stores import FsspecStore

    store = FsspecStore(f"memory://bounds-{uuid4().hex[:8]}")
    gone, elsewhere = f".tmp-{host_id()}-{dead_pid()}-0badc0de-blob", ".tmp-ffffffff-1-0badc0de-blob"
    for name in (gone, elsewhere):
        store.fs.pipe(f"{store.root}/blobs/ab/{name}", b"half a blob")
    report = Catalog(store).gc()
    assert report.temp_files == [f"blobs/ab/{gone}"]
    assert "younger than" in dict(report.kept)[f"blobs/ab/{elsewhere}"]
    store.fs.rm(store.root, recursive=True)
