"""Crash consistency: a guarded training process SIGKILLed at every file-system event of a save, and at
random moments, resumes from the newest complete snapshot and ends bitwise identical to an
uninterrupted run; nothing partial is ever listed; damaged files are skipped with a message.

Three guarded processes are killed: (a) a plain script on the Python API (``nbguard.Guard``), (b) a real
Jupyter kernel running ``%%checkpointed`` (e2e), (c) a script saving to ``gdrive://`` through the Drive
API emulator, killed at its k-th request (e2e). Kill points come from ``LocalStore.on_event``; see
``tests/crash_harness.py`` for the children and the checks, ``scripts/stress.py`` for the long run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests import crash_harness as ch

pytestmark = pytest.mark.timeout(900)

KINDS = {"create", "write", "fsync", "rename", "fsync-dir", "delete"}


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    launcher = ch.Launcher(tmp_path_factory.mktemp("children"))
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def reference(launcher, tmp_path_factory):
    """The uninterrupted run without nbguard, and a fault-free guarded run that records every event."""
    child = launcher.fork("plain_child")
    assert child.wait() == 0, child.output()
    plain = ch.Report.parse(child.output()).digest
    events, guarded = ch.record_events(launcher, tmp_path_factory.mktemp("record") / "store")
    assert guarded.digest == plain, "a guarded run must end exactly like a plain one"
    assert len(guarded.committed) == ch.STEPS // ch.SAVE_EVERY
    return plain, events


def is_manifest(path: str) -> bool:
    """A snapshot's manifest (writer leases under leases/ are JSON files too)."""
    return path.startswith("runs/") and path.endswith(".json")


def failures(trials: list[ch.Trial]) -> str:
    return "\n\n".join(t.describe() for t in trials if not t.ok or t.unreported)


# -- (a) a plain script ----------------------------------------------------------------------------------
def test_a_save_goes_through_every_kind_of_file_system_event(reference):
    _, events = reference
    third = [events[i - 1] for i in ch.events_of_save(events, 3)]
    assert {kind for kind, _, _ in third} == KINDS, "save 3 should write blob and manifest and apply retention"
    assert [kind for kind, path, _ in third if is_manifest(path)][:5] == [
        "create", "write", "fsync", "rename", "fsync-dir"]
    # The blob's own events: from its creation to the manifest's (the previous save's retention, which
    # moves unused blobs aside and deletes them, may still be running when save 3 is counted).
    start = next(i for i, (kind, path, _) in enumerate(third) if kind == "create" and path.startswith("blobs/"))
    commit = next(i for i, (kind, path, _) in enumerate(third) if kind == "create" and is_manifest(path))
    blob_events = [kind for kind, path, _ in third[start:commit] if path.startswith("blobs/")]
    assert blob_events[-3:] == ["fsync", "rename", "fsync-dir"]


def test_killed_at_every_event_of_a_save_resumes_from_the_newest_complete_snapshot(launcher, reference, tmp_path):
    """Every event of the third save (blob, manifest, retention deletes), plus the first save's."""
    plain, events = reference
    points = ch.events_of_save(events, 3) + ch.events_of_save(events, 1)
    trials = [ch.script_trial(launcher, tmp_path / f"k{k}", plain, kill_at=k) for k in points]
    assert all(t.killed for t in trials)
    assert not failures(trials), failures(trials)
    # Kills before the manifest's rename resume from the save before; from the rename on, from this one.
    third = ch.events_of_save(events, 3)
    rename = next(k for k in third if events[k - 1][0] == "rename" and is_manifest(events[k - 1][1]))
    by_point = dict(zip(points, trials, strict=True))
    assert all(by_point[k].listed_steps == [4, 2] for k in third if k <= rename)
    assert all(by_point[k].listed_steps[0] == 6 for k in third if k > rename)
    print(f"\n{len(trials)} kill points, 0 lost, 0 wrong")


@pytest.mark.parametrize("seed", range(4))
def test_killed_at_a_random_moment_resumes_exactly(launcher, reference, tmp_path, seed):
    plain, _ = reference
    rnd = random.Random(seed)
    trial = ch.script_trial(launcher, tmp_path / "store", plain, delay=rnd.uniform(0.0, 0.2), step_sleep=0.02)
    assert trial.killed and trial.ok, trial.describe()


def test_a_real_script_killed_at_the_manifest_rename_resumes_exactly(launcher, reference, tmp_path):
    """The same, with ``python -m tests.crash_harness script`` as a fresh interpreter (no fork server)."""
    plain, events = reference
    k = next(k for k in ch.events_of_save(events, 2)
             if events[k - 1][0] == "rename" and is_manifest(events[k - 1][1]))
    trial = ch.script_trial(launcher, tmp_path / "store", plain, kill_at=k, use_script=True)
    assert trial.killed and trial.ok, trial.describe()
    assert trial.resumed is not None


# -- torn and damaged files --------------------------------------------------------------------------------
def first_event_of_save(events, n: int) -> int:
    return ch.events_of_save(events, n)[0]


def damaged_trial(launcher, reference, tmp_path, damage) -> ch.Trial:
    """Killed as save 5 starts (saves 3 and 4 are listed), the newest damaged, then resumed."""
    plain, events = reference
    return ch.script_trial(launcher, tmp_path / "store", plain, kill_at=first_event_of_save(events, 5),
                           damage=damage)


def _blob_half(folder: Path, listed) -> str:
    blob = ch.own_blob(folder, listed)
    ch.halve(folder / "blobs" / blob[:2] / f"{blob}.safetensors")
    return f"blob {blob} cut in half"


def _weight_flip(folder: Path, listed) -> str:
    return "bit flipped in " + ch.flip_entry_byte(folder, listed[0].id, "model/0.weight", at=7)


def _manifest_half(folder: Path, listed) -> str:
    from nbguard.format.manifest import manifest_path

    ch.halve(folder / manifest_path(ch.RUN, listed[0].id))
    return "manifest cut in half"


@pytest.mark.parametrize("damage", [_blob_half, _weight_flip], ids=["blob-cut-in-half", "weight-bit-flipped"])
def test_a_damaged_blob_is_skipped_with_one_message_and_the_previous_snapshot_used(launcher, reference, tmp_path,
                                                                                   damage):
    trial = damaged_trial(launcher, reference, tmp_path, damage)
    assert trial.torn and trial.ok and not trial.unreported, trial.describe()
    assert trial.resumed == trial.listed[1]


def test_a_torn_manifest_is_skipped_and_the_previous_snapshot_used(launcher, reference, tmp_path):
    trial = damaged_trial(launcher, reference, tmp_path, _manifest_half)
    assert trial.torn and trial.ok, trial.describe()
    assert trial.resumed == trial.listed[1]


def test_a_torn_manifest_is_reported_once(launcher, reference, tmp_path):
    trial = damaged_trial(launcher, reference, tmp_path, _manifest_half)
    assert trial.ok
    assert not trial.unreported, trial.describe()


def _rng_flip(folder: Path, listed) -> str:
    return "bit flipped in " + ch.flip_entry_byte(folder, listed[0].id, "rng/torch", at=100)


def test_a_damaged_rng_state_is_skipped_and_the_previous_snapshot_used(launcher, reference, tmp_path):
    trial = damaged_trial(launcher, reference, tmp_path, _rng_flip)
    assert trial.ok and not trial.unreported, trial.describe()


def _history_flip(folder: Path, listed) -> str:
    return ch.flip_history_digit(folder, listed[0].id)


def test_a_flipped_bit_in_a_manifest_is_detected(launcher, reference, tmp_path):
    trial = damaged_trial(launcher, reference, tmp_path, _history_flip)
    assert trial.ok and not trial.unreported, trial.describe()


def test_a_flipped_bit_in_a_manifest_type_tag_falls_back_to_the_previous_snapshot(launcher, reference, tmp_path):
    def damage(folder: Path, listed) -> str:
        return ch.flip_in_manifest(folder, listed[0].id, b'"$dict', 0x02, after=b'"sched"')

    trial = damaged_trial(launcher, reference, tmp_path, damage)
    assert trial.ok and not trial.unreported, trial.describe()


def test_a_torn_only_manifest_is_reported_to_a_script(launcher, reference, tmp_path):
    plain, events = reference
    trial = ch.script_trial(launcher, tmp_path / "store", plain, kill_at=first_event_of_save(events, 2),
                            damage=_manifest_half)
    assert trial.listed and len(trial.listed) == 1 and trial.resumed is None and trial.ok
    assert not trial.unreported, trial.describe()


def test_when_every_snapshot_is_damaged_the_script_starts_over_and_says_why(launcher, reference, tmp_path):
    plain, events = reference
    trial = ch.script_trial(launcher, tmp_path / "store", plain, kill_at=first_event_of_save(events, 2),
                            damage=_blob_half)
    assert trial.listed and len(trial.listed) == 1
    assert trial.expected_resume is None and trial.resumed is None
    assert trial.ok and not trial.unreported, trial.describe()
    assert any("no intact snapshot" in m for m in trial.messages), trial.messages


# -- (b) a notebook kernel running %%checkpointed -----------------------------------------------------------------
@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    """A kernel; the plain run's digest; a recorded fault-free guarded run's events."""
    from tests.kernel_harness import Kernel

    workdir = tmp_path_factory.mktemp("kernel")
    kernel = Kernel(str(workdir))
    try:
        kernel.run(ch.KERNEL_SETUP)
        kernel.run(ch.KERNEL_LOOP)
        plain = ch.kernel_digest(kernel)
        out, error = kernel.run("%load_ext nbguard")
        assert error is None, out
        kernel.run(ch.KERNEL_SETUP)
        store = str(workdir / "record")
        kernel.run(ch.kernel_hook_cell(store, str(workdir / "record.log"), None))
        out, error = kernel.run(ch.kernel_cell(store))
        assert error is None, out
        assert ch.kernel_digest(kernel) == plain, "a guarded cell must end exactly like a plain one"
        out, _ = kernel.run("print(json.dumps(_events))")
        events = ch.kernel_events(json.loads(out))
        holder = {"kernel": kernel}
        yield plain, events, holder, workdir
    finally:
        kernel.shutdown()


def kernel_points(events) -> dict[str, int]:
    third = ch.events_of_save(events, 3)
    pick = {}
    for k in third:
        kind, path, _ = events[k - 1]
        what = "manifest" if is_manifest(path) else "blob" if path.startswith("blobs/") else "other"
        pick.setdefault(f"{kind}-{what}", k)
    return {name: pick[name] for name in ("write-blob", "fsync-manifest", "rename-manifest", "delete-manifest")}


@pytest.mark.e2e
@pytest.mark.parametrize("point", ["write-blob", "fsync-manifest", "rename-manifest", "delete-manifest"])
def test_a_kernel_killed_at_an_event_resumes_exactly(notebook, tmp_path, point):
    plain, events, holder, _ = notebook
    k = kernel_points(events)[point]
    trial = ch.kernel_trial(holder["kernel"], tmp_path, plain, kill_at=k)
    assert trial.killed and trial.ok, trial.describe()
    assert trial.resumed is not None


@pytest.mark.e2e
@pytest.mark.parametrize("seed", range(2))
def test_a_kernel_killed_at_a_random_moment_resumes_exactly(notebook, tmp_path, seed):
    plain, _, holder, _ = notebook
    delay = random.Random(seed).uniform(0.0, 0.3)
    trial = ch.kernel_trial(holder["kernel"], tmp_path, plain, delay=delay)
    assert trial.killed and trial.ok, trial.describe()


@pytest.mark.e2e
def test_a_kernel_resumes_from_the_previous_snapshot_when_the_newest_blob_is_torn(notebook, tmp_path):
    plain, events, holder, _ = notebook
    k = ch.events_of_save(events, 4)[0]  # killed as the 4th save starts: saves 2 and 3 are listed
    trial = ch.kernel_trial(holder["kernel"], tmp_path, plain, kill_at=k, damage=_blob_half)
    assert trial.killed and trial.torn and trial.ok and not trial.unreported, trial.describe()
    assert trial.resumed == trial.listed[1]


# -- (c) Google Drive through the emulator ---------------------------------------------------------------------
@pytest.fixture
def emulator():
    from tests.drive_emulator import DriveEmulator

    with DriveEmulator() as emu:
        yield emu
        assert emu.errors == [], emu.errors[0]


@pytest.fixture(scope="module")
def drive_requests(launcher, tmp_path_factory):
    """How many requests a fault-free run to gdrive:// sends, by kind."""
    from tests.drive_emulator import DriveEmulator

    workdir = tmp_path_factory.mktemp("drive-record")
    with DriveEmulator() as emu:
        child = launcher.fork(env=ch.drive_env(emu, workdir / "staging"), location="gdrive://nbguard/crash",
                              flush_remote=60.0)
        assert child.wait() == 0, child.output()
        return [f"{r.method} {r.path}" for r in emu.requests]


def drive_points(requests: list[str]) -> dict[str, int]:
    first = {}
    for i, request in enumerate(requests, 1):
        kind = ("token" if "/token" in request else "upload-start" if request.startswith("POST /upload")
                else "upload-data" if request.startswith("PUT /upload") else "delete" if request.startswith("DELETE")
                else "folder" if request.startswith("POST") else "list")
        first.setdefault(kind, i)
    first["late"] = int(len(requests) * 0.6)  # the request count varies from run to run (uploads coalesce)
    return first


@pytest.mark.e2e
@pytest.mark.parametrize(("point", "vm_loss"), [("token", False), ("upload-start", False), ("upload-data", False),
                                                ("late", False), ("upload-data", True), ("late", True)])
def test_a_drive_run_killed_at_a_request_resumes_exactly(launcher, reference, drive_requests, emulator, tmp_path,
                                                         point, vm_loss):
    """Same staging folder (a kernel crash) or a fresh one (a VM loss: only what reached Drive counts).
    Drive never lists a partial snapshot, the newest complete one is resumed, the result is exact."""
    plain, _ = reference
    k = drive_points(drive_requests)[point]
    trial = ch.drive_trial(launcher, emulator, tmp_path, plain, k=k, vm_loss=vm_loss)
    assert trial.killed and trial.ok, trial.describe()


@pytest.mark.e2e
def test_uploads_cut_short_by_a_kill_reach_drive_after_the_restart(launcher, reference, emulator, tmp_path):
    """Training finished locally, the process died while uploads were pending; the re-run has nothing to
    train (it restores the final state) and flushes: Drive must then hold the final snapshot."""
    plain, _ = reference
    emulator.inject("slow", times=10**6, match="PUT /upload/", delay=0.3)
    staging = tmp_path / "staging"
    child = launcher.fork(env=ch.drive_env(emulator, staging), location="gdrive://nbguard/crash", flush_remote=60.0)
    child.wait_for(lambda out: f" {ch.STEPS}\n" in out and "COMMITTED" in out)
    child.kill()
    child.wait()
    emulator.clear_faults()
    again = launcher.fork(env=ch.drive_env(emulator, staging), location="gdrive://nbguard/crash", flush_remote=60.0)
    assert again.wait() == 0
    report = ch.Report.parse(again.output())
    assert report.digest == plain and report.resumed and report.resumed[1] == ch.STEPS
    from nbguard.stores.drive import DriveStore

    remote = DriveStore("gdrive://nbguard/crash", credentials=emulator.authorized_user_info(), api_root=emulator.url,
                        cache_dir=str(tmp_path / "cache"))
    final = ch.intact_snapshots(remote)
    assert final and final[0].id == report.resumed[0]


# -- concurrency: two processes writing to the same folder -------------------------------------------------------
@pytest.mark.parametrize("runs", [("shared", "shared"), ("notebook-a", "notebook-b")],
                         ids=["two-kernels-one-run", "two-notebooks"])
def test_two_processes_saving_to_one_folder_do_not_damage_each_other(launcher, tmp_path, runs):
    """Both save after every step, with aggressive retention, starting together; afterwards every listed
    snapshot verifies and each process's newest snapshot restores to exactly the state it held."""
    import time

    import nbguard

    store = str(tmp_path / "store")
    start = time.time() + 0.3
    children = [launcher.fork("concurrent_child", location=store, run=run, tag=tag, seed=seed, steps=30, keep=1,
                              start_at=start + offset)
                for run, tag, seed, offset in zip(runs, "ab", (1, 2), (0.0, 0.004), strict=True)]
    reports = []
    for child in children:
        assert child.wait() == 0, child.output()
        reports.append(ch.Report.parse(child.output()))
    assert all(len(r.committed) == 30 and not r.failed for r in reports), [r.text[-500:] for r in reports]
    catalog = nbguard.Catalog(store)
    listed = {s.id: s for s in catalog.snapshots()}
    assert catalog.problems == {} and catalog.verify() == {}
    for report, run, seed in zip(reports, runs, (1, 2), strict=True):
        newest_id = report.committed[-1][0]
        assert newest_id in listed, "a process's newest snapshot was deleted by the other's retention"
        fresh = ch.make_training(seed + 100)
        restored = nbguard.Guard(store, run=run, report=None).restore(ch.state_of(fresh), ref=newest_id)
        fresh["history"][:] = restored.values["history"]
        assert ch.digest(fresh) == report.digests[newest_id]


def test_retention_in_one_kernel_does_not_delete_a_blob_another_kernel_is_committing(tmp_path):
    """Two kernels of one notebook (same run, same seeds), B one save behind A: B has written its blob
    (identical to A's previous one) and is about to commit its manifest when A's retention runs."""
    import threading

    import numpy as np
    import torch

    import nbguard
    from nbguard import Guard, LocalStore

    gate, reached = threading.Event(), threading.Event()

    def hold_before_the_manifest(kind: str, path: str) -> None:
        if kind == "create" and is_manifest(path):
            reached.set()
            gate.wait(30)

    a = Guard(LocalStore(tmp_path), run="shared", keep=1, report=None)
    b = Guard(LocalStore(tmp_path, on_event=hold_before_the_manifest), run="shared", keep=1, report=None)
    w = torch.ones(1000)
    a.save({"w": w}, wait=True).result()
    pending = b.save({"w": w})  # the same state a step later in the other kernel: the same blob
    assert reached.wait(30)
    np.random.rand(2000)  # A trains on: every group of its next snapshot changes
    torch.rand(1)
    w.fill_(2.0)
    a.save({"w": w}, wait=True).result()  # A's retention drops its first snapshot and that blob
    gate.set()
    b_info = pending.result()
    catalog = nbguard.Catalog(str(tmp_path))
    assert b_info.id in [s.id for s in catalog.snapshots("shared")]
    assert catalog.verify() == {}
