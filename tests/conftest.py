"""Shared fixtures.

Engine fixtures: the store factories every store-contract test runs against, a fixture that
keeps the global random generators from leaking between tests, and a report collector.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from nbguard.stores import FsspecStore, LocalStore, MemoryStore, Store
from tests.drive_emulator import emulated_drive_store, stop_emulated_drive_store

# Test files whose outcome depends on the interpreter (bytecode of rewritten loops, sys.monitoring on
# 3.12+ against settrace before, IPython's shell and kernels, pickling): they carry the `interpreter`
# marker, and CI runs them again under every other Python it tests (scripts/test_leg.sh). Single
# tests elsewhere can be marked with @pytest.mark.interpreter.
INTERPRETER_DEPENDENT_FILES = frozenset({
    "test_loops.py",
    "test_loops_resume.py",
    "test_magics.py",
    "test_kernel_e2e.py",
    "test_engine_roundtrip.py",
    "test_function_loops.py",  # frame locals are written back differently on 3.11/3.12 and 3.13
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in INTERPRETER_DEPENDENT_FILES:
            item.add_marker(pytest.mark.interpreter)


class StoreFactory(NamedTuple):
    """How to make one kind of store for a test: ``make(tmp_path)`` returns a fresh, empty store;
    ``cleanup(store)`` (optional) releases it after the test."""

    id: str
    make: Callable[[Path], Store]
    cleanup: Callable[[Store], None] | None = None


def _fsspec_memory_store(tmp_path: Path) -> Store:
    # fsspec's memory file system is one class-wide dict: a unique root keeps tests apart.
    return FsspecStore(f"memory://nbguard-tests/{uuid.uuid4().hex}")


def _drop_fsspec_root(store: Store) -> None:
    assert isinstance(store, FsspecStore)
    if store.fs.exists(store.root):
        store.fs.rm(store.root, recursive=True)


# Every store the contract suite (tests/test_store_contract.py) runs against. Add a backend by
# appending a StoreFactory here (e.g. the Drive emulator's store).
STORE_FACTORIES: list[StoreFactory] = [
    StoreFactory("local", lambda tmp_path: LocalStore(tmp_path / "store")),
    StoreFactory("memory", lambda tmp_path: MemoryStore(f"test-{uuid.uuid4().hex[:8]}")),
    StoreFactory("fsspec-memory", _fsspec_memory_store, _drop_fsspec_root),
    StoreFactory("gdrive-emulator", emulated_drive_store, stop_emulated_drive_store),
]


@pytest.fixture(params=STORE_FACTORIES, ids=lambda f: f.id)
def any_store(request: pytest.FixtureRequest, tmp_path: Path):
    """A fresh empty store of each kind in STORE_FACTORIES."""
    factory: StoreFactory = request.param
    store = factory.make(tmp_path)
    yield store
    if factory.cleanup is not None:
        factory.cleanup(store)


@pytest.fixture
def fixed_rng():
    """Seed python, numpy and torch's global generators, and put their states back afterwards
    (restoring a snapshot sets them)."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


@pytest.fixture
def reports() -> list[str]:
    """A list that collects the messages a Guard reports (pass ``report=reports.append``)."""
    return []


@pytest.fixture
def shell(tmp_path, monkeypatch):
    """A real in-process IPython shell with nbguard loaded, snapshots in a tmp folder."""
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NBGUARD_DIR", str(tmp_path / "snaps"))
    sh = InteractiveShell.instance()
    sh.user_ns.clear()
    sh.run_line_magic("load_ext", "nbguard")
    yield sh
    sh.run_line_magic("unload_ext", "nbguard")
    sh.user_ns.clear()
    InteractiveShell.clear_instance()
