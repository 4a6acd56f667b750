"""The save handle and the background writer: save() returns once the state is staged, one save at a
time, errors keep their type, and a pending save is finished at interpreter exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from nbguard import Catalog, Guard, LocalStore, NbguardError, SaveHandle, SnapshotInfo, StoreError

REPO = Path(__file__).resolve().parents[1]
RUN = "async"


class GatedStore(LocalStore):
    """A LocalStore whose writes wait for ``gate``; it records how many writes ever overlapped."""

    def __init__(self, root):
        super().__init__(root)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self._lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.completed: list[str] = []

    def write(self, path, chunks, progress=None):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.entered.set()
        try:
            assert self.gate.wait(30), "the test never opened the gate"
            super().write(path, chunks, progress)
            self.completed.append(path)
        finally:
            with self._lock:
                self.active -= 1


@pytest.fixture
def gated(tmp_path):
    store = GatedStore(tmp_path / "store")
    guard = Guard(store, run=RUN, keep=10, report=None)
    yield store, guard
    store.gate.set()
    guard.flush(10)


def test_save_returns_before_the_write_and_the_handle_follows_it(gated):
    store, guard = gated
    model = nn.Linear(8, 8)
    expected = model.weight.detach().clone()
    handle = guard.save({"model": model})
    assert isinstance(handle, SaveHandle)
    assert store.entered.wait(10)
    assert not handle.done()
    assert guard.busy
    assert not handle.wait(0.05)
    with pytest.raises(TimeoutError):
        handle.result(timeout=0.05)
    assert guard.snapshots() == []  # nothing is visible before the manifest is written

    with torch.no_grad():  # training goes on while the snapshot is written
        model.weight.add_(1)
    store.gate.set()
    assert handle.wait(10)
    assert handle.done()
    assert guard.flush(10) and not guard.busy  # retention follows the durable commit on the writer thread
    assert handle.exception() is None
    info = handle.result()
    assert isinstance(info, SnapshotInfo) and info.id == handle.id
    assert guard.latest().id == handle.id
    saved = guard.load().state_dict("model")["weight"]
    assert torch.equal(saved, expected), "the snapshot holds the state of save time, not of write time"
    assert guard.last_saved.id == handle.id
    assert guard.last_stats.durable_after >= guard.last_stats.stall


def test_save_wait_true_returns_a_finished_handle(tmp_path):
    guard = Guard(tmp_path / "store", run=RUN, report=None)
    handle = guard.save({"x": 1}, wait=True)
    assert handle.done() and handle.result().id == handle.id


def test_one_save_in_flight_a_second_save_waits_for_it(gated):
    store, guard = gated
    model = nn.Linear(8, 8)
    first = guard.save({"model": model, "n": 0})
    assert store.entered.wait(10)

    returned: list[tuple[int, bool]] = []

    def second_save(n: int) -> None:
        guard.save({"model": model, "n": n})
        returned.append((n, first.done()))

    threads = [threading.Thread(target=second_save, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    assert returned == [], "a save returned while another one was still being written"
    assert all(t.is_alive() for t in threads)
    store.gate.set()
    for t in threads:
        t.join(10)
    assert sorted(n for n, _ in returned) == [1, 2]
    assert all(first_done for _, first_done in returned)
    assert guard.flush(10)
    assert store.max_active == 1, "two writes overlapped"
    assert len(guard.snapshots()) == 3
    assert guard.catalog.verify() == {}


def test_flush_waits_for_the_save_in_flight(gated):
    store, guard = gated
    handle = guard.save({"x": torch.arange(10)})
    assert store.entered.wait(10)
    assert guard.flush(timeout=0.1) is False
    store.gate.set()
    assert guard.flush() is True
    assert handle.done() and not guard.busy


class QuotaExceeded(StoreError):
    pass


class FailingStore(LocalStore):
    def __init__(self, root, error: BaseException):
        super().__init__(root)
        self.error = error

    def write(self, path, chunks, progress=None):
        raise self.error


@pytest.mark.parametrize("error", [QuotaExceeded("Drive quota exceeded: free some space"),
                                   ValueError("a bug in a third-party store")],
                         ids=["store-error-subclass", "other-error"])
def test_the_handle_re_raises_the_original_error_type(tmp_path, error):
    reports: list[str] = []
    guard = Guard(FailingStore(tmp_path / "store", error), run=RUN, report=reports.append)
    handle = guard.save({"x": 1})  # does not raise
    assert handle.wait(10)
    assert handle.exception() is error
    with pytest.raises(type(error)) as raised:
        handle.result()
    assert raised.value is error
    assert guard.last_error is error
    assert guard.snapshots() == []
    assert len(reports) == 1


def test_a_closed_guard_refuses_to_save_with_an_nbguard_error(tmp_path):
    guard = Guard(tmp_path / "store", run=RUN, report=None)
    guard.save({"x": 1}, wait=True)
    assert guard.close(10) is True
    with pytest.raises(NbguardError):
        guard.save({"x": 2})
    assert len(guard.snapshots()) == 1


EXIT_SCRIPT = textwrap.dedent("""
    import sys, time
    import nbguard

    class Slow(nbguard.LocalStore):
        def write(self, path, chunks, progress=None):
            time.sleep(float(sys.argv[2]))
            super().write(path, chunks, progress)

    guard = nbguard.Guard(Slow(sys.argv[1]), run="exit", report=None)
    handle = guard.save({"epoch": 3, "w": list(range(1000))})
    print("done" if handle.done() else "pending", flush=True)
    # the interpreter exits right here, with the save still in flight
""")


def run_exit_script(store_dir: Path, delay: float, exit_timeout: str | None = None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if exit_timeout is not None:
        env["NBGUARD_EXIT_TIMEOUT"] = exit_timeout
    return subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(store_dir), str(delay)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_pending_save_is_finished_at_interpreter_exit(tmp_path):
    result = run_exit_script(tmp_path / "store", 0.5)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "pending"
    catalog = Catalog(tmp_path / "store")
    (info,) = catalog.snapshots("exit")
    assert catalog.get(info.id, "exit").value("epoch") == 3
    assert catalog.verify() == {}


def test_a_save_still_pending_after_the_exit_timeout_is_reported_lost(tmp_path):
    result = run_exit_script(tmp_path / "store", 5.0, exit_timeout="0.2")
    assert result.returncode == 0, result.stderr
    assert "still being written" in result.stderr and "NBGUARD_EXIT_TIMEOUT" in result.stderr
    assert Catalog(tmp_path / "store").snapshots("exit") == []
