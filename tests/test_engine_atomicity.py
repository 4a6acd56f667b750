"""A save cut short at any point leaves no visible snapshot and never harms an earlier one.

Faults are injected by stores that fail their k-th write, for every k over the writes of one
save; a real writer process is also SIGKILLed at random moments.
"""

from __future__ import annotations

import copy
import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from nbguard import Catalog, Guard, LocalStore, MemoryStore, StoreError
from nbguard.format.manifest import manifest_path
from nbguard.stores import TEMP_PREFIX

REPO = Path(__file__).resolve().parents[1]
RUN = "faults"

pytestmark = pytest.mark.usefixtures("fixed_rng")


class FaultyWrites:
    """Mixed into a real store: the write numbered ``fail_at`` fails in the way ``mode`` says.

    refuse   the store raises StoreError before writing anything
    enospc   the disk fills up halfway through the file (OSError ENOSPC from the data)
    leftover a half-written temporary file stays behind (as after a crash), then StoreError
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.writes = 0
        self.fail_at: int | None = None
        self.mode = "refuse"
        self.always = False
        self.failures = 0

    def arm(self, k: int, mode: str) -> None:
        """Fail the k-th write from now."""
        self.fail_at, self.mode = self.writes + k, mode

    def arm_always(self, mode: str) -> None:
        """Fail every write until disarmed (a full disk)."""
        self.always, self.mode = True, mode

    def disarm(self) -> None:
        self.fail_at, self.always = None, False

    def _failing(self) -> bool:
        self.writes += 1
        if not self.always and (self.fail_at is None or self.writes != self.fail_at):
            return False
        self.failures += 1
        return True

    @staticmethod
    def _half_then_full(chunks):
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            yield view[: max(1, len(view) // 2)]
            raise OSError(errno.ENOSPC, "No space left on device")

    def _leave_half(self, folder: str, name: str, chunks) -> None:
        os.makedirs(folder, exist_ok=True)
        data = b"".join(bytes(memoryview(c).cast("B")) for c in chunks)
        with open(os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}"), "wb") as f:
            f.write(data[: len(data) // 2])

    def write(self, path, chunks, progress=None):
        if not self._failing():
            return super().write(path, chunks, progress)
        if self.mode == "refuse":
            raise StoreError(f"injected: the storage place refused to write {path}")
        if self.mode == "enospc":
            return super().write(path, self._half_then_full(chunks), progress)
        if self.mode == "leftover":
            assert isinstance(self, LocalStore)
            self._leave_half(*os.path.split(self._abs(path)), chunks)
            raise StoreError(f"injected: writing {path} was cut short")
        raise AssertionError(self.mode)

class FaultyLocal(FaultyWrites, LocalStore):
    def write_with_header(self, header_size, pieces, finish, progress=None):
        """The streamed blob writes of LocalStore fail the same ways."""
        if not self._failing():
            return super().write_with_header(header_size, pieces, finish, progress)
        if self.mode == "refuse":
            raise StoreError("injected: the storage place refused to write a blob")
        if self.mode == "enospc":
            return super().write_with_header(header_size, self._half_then_full(pieces), finish, progress)
        if self.mode == "leftover":
            self._leave_half(self._abs("blobs"), "blob", pieces)
            raise StoreError("injected: writing a blob was cut short")
        raise AssertionError(self.mode)


class FaultyMemory(FaultyWrites, MemoryStore):
    pass



def failures(reports: list[str]) -> list[str]:
    """Reports of a failure (a later "saving works again" marks the recovery)."""
    return [r for r in reports if r != "saving works again"]

def make_store(kind: str, tmp_path: Path):
    return FaultyLocal(tmp_path / "store") if kind == "local" else FaultyMemory(f"faulty-{uuid.uuid4().hex[:6]}")


class Training:
    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.history: list[float] = []

    def step(self) -> None:
        loss = self.model(torch.randn(8, 32)).pow(2).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.history.append(loss.item())

    def state(self) -> dict:
        return {"model": self.model, "opt": self.opt, "history": self.history}

    def copy(self) -> dict:
        return {"model": copy.deepcopy(self.model.state_dict()), "opt": copy.deepcopy(self.opt.state_dict()),
                "history": list(self.history)}


def assert_restores_to(store, expected: dict) -> None:
    fresh = Training(seed=99)
    report = Guard(store, run=RUN, report=None).restore(fresh.state())
    for key, value in expected["model"].items():
        assert torch.equal(fresh.model.state_dict()[key], value), key
    assert report.values["history"] == expected["history"]
    assert repr(fresh.opt.state_dict()) == repr(expected["opt"])


def count_writes_of_one_save(kind: str, tmp_path: Path) -> int:
    store = make_store(kind, tmp_path / "probe")
    training = Training()
    guard = Guard(store, run=RUN, report=None)
    training.step()
    guard.save(training.state(), wait=True).result()
    before = store.writes
    training.step()
    guard.save(training.state(), wait=True).result()
    return store.writes - before


MODES = [("local", "refuse"), ("local", "enospc"), ("local", "leftover"), ("memory", "refuse"), ("memory", "enospc")]


@pytest.mark.parametrize("kind,mode", MODES, ids=[f"{k}-{m}" for k, m in MODES])
def test_a_failed_write_at_any_point_leaves_the_previous_snapshot_intact(tmp_path, kind, mode):
    writes = count_writes_of_one_save(kind, tmp_path)
    assert writes >= 2  # at least a blob, then the manifest
    for k in range(1, writes + 1):
        store = make_store(kind, tmp_path / f"k{k}")
        reports: list[str] = []
        guard = Guard(store, run=RUN, report=reports.append)
        training = Training()
        training.step()
        good = guard.save(training.state(), wait=True).result()
        good_state = training.copy()

        training.step()
        store.arm(k, mode)
        handle = guard.save(training.state())  # never raises into the training loop
        assert handle.wait(30)
        assert store.failures == 1
        error = handle.exception()
        if kind == "memory" and mode == "enospc":
            assert isinstance(error, OSError) and error.errno == errno.ENOSPC
            with pytest.raises(OSError):
                handle.result()
        else:
            assert isinstance(error, StoreError), f"write {k}: {error!r}"
            with pytest.raises(StoreError):
                handle.result()
        if kind == "local" and mode == "enospc":
            assert error.__cause__ is not None and error.__cause__.errno == errno.ENOSPC
            assert "disk is full" in str(error)
        assert guard.last_error is error
        assert len(failures(reports)) == 1, f"write {k}: the failure must be reported exactly once, got {reports}"
        assert "earlier snapshots are intact" in reports[0] or "injected" in reports[0] or "disk" in reports[0]

        catalog = Catalog(store)
        assert [s.id for s in catalog.snapshots(RUN)] == [good.id], f"write {k}: a partial snapshot is listed"
        assert not store.exists(manifest_path(RUN, handle.id))
        assert catalog.verify() == {}
        assert_restores_to(store, good_state)
        if mode == "leftover":
            assert all(TEMP_PREFIX not in f.path for folder in ("blobs", f"runs/{RUN}/snapshots")
                       for f in store.list(folder))
            report = catalog.gc(grace=0)
            assert report.temp_files, "the leftover temporary file was not collected"
            assert not [p for p in (tmp_path / f"k{k}").rglob(f"{TEMP_PREFIX}*")]

        # The fault clears: the next save succeeds and holds the new state.
        store.disarm()
        training.step()
        recovered = guard.save(training.state(), wait=True).result()
        assert [s.id for s in Catalog(store).snapshots(RUN)] == [recovered.id, good.id]
        assert Catalog(store).verify() == {}
        assert_restores_to(store, training.copy())
        assert len(failures(reports)) == 1


def test_a_lasting_fault_is_reported_once_and_never_raised(tmp_path):
    store = FaultyLocal(tmp_path / "store")
    reports: list[str] = []
    guard = Guard(store, run=RUN, report=reports.append)
    training = Training()
    training.step()
    first = guard.save(training.state(), wait=True).result()
    failing = []
    store.arm_always("enospc")
    for _ in range(5):
        training.step()
        failing.append(guard.save(training.state()))
    guard.flush()
    assert all(isinstance(h.exception(), StoreError) for h in failing)
    assert len(failures(reports)) == 1 and "disk is full" in reports[0]
    assert [s.id for s in guard.snapshots()] == [first.id]
    store.disarm()
    guard.save(training.state(), wait=True).result()
    assert len(guard.snapshots()) == 2 and guard.catalog.verify() == {}


def test_an_error_outside_the_store_is_reported_too(tmp_path):
    """Whatever ends a background save (here a listener of the store that is not a StoreError),
    the user hears of it once: nobody looks at the handle of an autosave."""

    class Broken(MemoryStore):
        def write(self, path, chunks, progress=None):
            if path.endswith(".json"):
                raise PermissionError(errno.EACCES, "Permission denied")
            return super().write(path, chunks, progress)

    reports: list[str] = []
    guard = Guard(Broken(), run=RUN, report=reports.append)
    training = Training()
    handle = guard.save(training.state(), wait=True)
    assert isinstance(handle.exception(), PermissionError)
    assert len(failures(reports)) == 1
    assert guard.snapshots() == []


# -- a real writer process, killed -----------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, torch, nbguard
    guard = nbguard.Guard(sys.argv[1], run="killed", keep=3, report=None)
    w = torch.empty(13_000_000)  # ~50 MB
    print("ready", flush=True)
    i = int(sys.argv[2])
    while True:
        w.fill_(float(i))
        guard.save({"w": w, "i": i}, position={"i": i}, wait=True)
        print(i, flush=True)
        i += 1
""")


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_killed_writer_never_leaves_a_broken_snapshot(tmp_path):
    store_dir = tmp_path / "store"
    rnd = random.Random(os.getpid())
    start = 0
    saved_lines = 0
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(store_dir), str(start)], cwd=REPO,
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdout.readline().strip() == "ready"
        if round_ == 0:
            for _ in range(2):  # at least two complete snapshots exist
                proc.stdout.readline()
                saved_lines += 1
        time.sleep(rnd.uniform(0.0, 1.2))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        saved_lines += len(out.split())
        start += 1000

    catalog = Catalog(store_dir)
    snapshots = catalog.snapshots("killed")
    assert snapshots, "no snapshot survived"
    assert catalog.problems == {}
    assert catalog.verify() == {}
    for info in snapshots:
        values = catalog.get(info.id, "killed").restore(rng=False).values
        assert values["i"] == info.position["i"]
        w = values["w"]
        assert w.numel() == 13_000_000 and bool((w == float(values["i"])).all()), f"{info.id} holds torn data"

    store = LocalStore(store_dir)
    gc_report = catalog.gc(grace=0)
    leftovers = [p for p in store_dir.rglob(f"{TEMP_PREFIX}*")]
    assert leftovers == [], f"gc left temporary files: {leftovers}"
    assert catalog.verify() == {}
    referenced = catalog.referenced_blobs()
    on_disk = {f.path.rsplit("/", 1)[-1].removesuffix(".safetensors")
               for p in store.folders("blobs") for f in store.list(f"blobs/{p}")}
    assert on_disk == referenced
    print(f"{len(snapshots)} snapshots survived {saved_lines} saves and 6 kills; "
          f"gc removed {len(gc_report.temp_files)} temporary files and {len(gc_report.blobs)} orphan blobs")
