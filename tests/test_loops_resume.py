"""Exact resume of rewritten training cells: interrupted at a safe point, re-run with a fresh
namespace, they end bitwise identical to an uninterrupted plain run.

The test plays the caller: births are the global RNG states (plus any torch.Generator), the safe
point callback deep-copies the state and raises ``Crash``, ``on_resume`` puts it back.
"""

from __future__ import annotations

import copy
import random
import sys

import numpy as np
import pytest
import torch

from nbguard.training.loops import SKIPPED, LoopRuntime, ResumePlan, SafePoint, instrument_cell

SETUP = '''
import itertools, io, random
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm, trange

class Points(Dataset):
    """Regression points; counts __getitem__ per index in shared memory (seen by workers too)."""
    def __init__(self, n, noisy=True):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
        self.hits = torch.zeros(n, dtype=torch.int32).share_memory_()
        self.noisy = noisy
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        self.hits[i] += 1
        x = self.x[i]
        if self.noisy:  # augmentation with the global RNG (main process only)
            x = x + 0.01 * torch.randn(4)
        return x, self.y[i]

def make_model():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

def train_step(model, opt, x, y):
    model.train()
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    return loss.item()

sink = io.StringIO()
'''

PRELUDE = '''
torch.manual_seed(0); random.seed(0); np.random.seed(0)
model = make_model()
opt = torch.optim.Adam(model.parameters(), lr=0.01)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
history = []
'''

NESTED_ENUMERATE = PRELUDE + '''
loader = DataLoader(Points(40), batch_size=4, shuffle=True, num_workers=WORKERS)
total = 0.0
for epoch in range(3):
    running = 0.0
    for i, (x, y) in enumerate(loader):
        if epoch == 1 and i == 3:
            continue
        running += train_step(model, opt, x, y)
        total += random.random() + float(np.random.rand())
    sched.step()
    history.append(running)
'''

TQDM_BREAK = PRELUDE + '''
loader = DataLoader(Points(40), batch_size=4, shuffle=True)
for epoch in trange(3, file=sink):
    for x, y in tqdm(loader, file=sink, leave=False):
        loss = train_step(model, opt, x, y)
        if loss < 0.0 or len(history) >= 8 * (epoch + 1):
            break
        history.append(loss)
    sched.step()
'''

ENUMERATE_TQDM_ZIP = PRELUDE + '''
g = torch.Generator().manual_seed(7)
loader = DataLoader(Points(36), batch_size=4, shuffle=True, generator=g)
weights = [1.0, 0.5, 2.0] * 10
for epoch in range(2):
    for i, (x, y) in enumerate(tqdm(loader, file=sink)):
        history.append(train_step(model, opt, x, y))
    for (x, y), w in zip(loader, weights):
        history.append(w * train_step(model, opt, x, y))
    sched.step()
'''

WHILE_STEPS = PRELUDE + '''
loader = DataLoader(Points(24), batch_size=4, shuffle=True)
step, max_steps = 0, 15
while step < max_steps:
    for x, y in loader:
        history.append(train_step(model, opt, x, y))
        step += 1
        if step >= max_steps:
            break
    sched.step()
'''

WORKERS_CELL = PRELUDE + '''
loader = DataLoader(Points(48, noisy=False), batch_size=4, shuffle=True, num_workers=2,
                    persistent_workers=PERSISTENT)
for epoch in range(3):
    for x, y in loader:
        history.append(train_step(model, opt, x, y))
    sched.step()
'''


class Crash(Exception):
    """Stands for the notebook's kernel dying at a safe point."""


def _generators(ns: dict) -> list[str]:
    return sorted(name for name, value in ns.items() if isinstance(value, torch.Generator))


def _capture_rng(ns: dict) -> dict:
    return {"torch": torch.get_rng_state(), "random": random.getstate(), "numpy": np.random.get_state(),
            "generators": {name: ns[name].get_state() for name in _generators(ns)}}


def _apply_rng(ns: dict, states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["random"])
    np.random.set_state(states["numpy"])
    for name, state in states["generators"].items():
        ns[name].set_state(state)


STATEFUL = (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)
PLAIN = (int, float, str, list, tuple, dict, torch.Tensor)


def _snapshot(ns: dict) -> dict:
    objects = {name: copy.deepcopy(v.state_dict()) for name, v in ns.items() if isinstance(v, STATEFUL)}
    values = {name: copy.deepcopy(v) for name, v in ns.items()
              if isinstance(v, PLAIN) and not name.startswith("__") and v is not SKIPPED}
    return {"objects": objects, "values": values, "rng": _capture_rng(ns)}


def _restore(ns: dict, snap: dict) -> None:
    for name, state in snap["objects"].items():
        ns[name].load_state_dict(copy.deepcopy(state))
    for name, value in snap["values"].items():
        ns[name] = copy.deepcopy(value)
    _apply_rng(ns, snap["rng"])


def _fresh_namespace() -> dict:
    ns: dict = {"__name__": "__main__"}
    exec(SETUP, ns)
    return ns


def _stop_workers(ns: dict) -> None:
    # Persistent workers of a loader that dies inside a reference cycle (a namespace) are only
    # joined after a 5 s timeout each: stop them while the loader is intact.
    for value in ns.values():
        if isinstance(value, torch.utils.data.DataLoader) and value._iterator is not None:
            value._iterator._shutdown_workers()


def run_plain(source: str) -> dict:
    ns = _fresh_namespace()
    exec(compile(source, "<plain>", "exec"), ns)
    _stop_workers(ns)
    return ns


def run_guarded(source: str, *, stop_at: int | None = None, plan: ResumePlan | None = None,
                snapshot: dict | None = None) -> tuple[dict, list[SafePoint], dict | None, LoopRuntime]:
    """Run the instrumented cell with a safe point requested at every iteration end; at the
    ``stop_at``-th one (0-based) take a snapshot and crash."""
    cell = instrument_cell(source)
    ns = _fresh_namespace()
    points: list[SafePoint] = []
    taken: dict = {}

    def on_safe_point(point: SafePoint) -> None:
        points.append(point)
        if len(points) - 1 == stop_at:
            taken.update(_snapshot(ns), positions=point.positions)
            raise Crash
        runtime.request_safe_point("test")

    runtime = LoopRuntime(
        cell, on_safe_point=on_safe_point,
        capture_birth=lambda: _capture_rng(ns), apply_birth=lambda birth: _apply_rng(ns, birth),
        resume=plan, on_resume=(lambda: _restore(ns, snapshot)) if snapshot is not None else None)
    with runtime.active():
        runtime.request_safe_point("test")
        try:
            runtime.execute(ns)
        except Crash:
            pass
    _stop_workers(ns)
    return ns, points, taken or None, runtime


def assert_same(expected: dict, got: dict) -> None:
    for name, value in expected.items():
        if isinstance(value, torch.nn.Module | torch.optim.Optimizer):
            _assert_tree(value.state_dict(), got[name].state_dict(), name)
        elif isinstance(value, torch.optim.lr_scheduler.LRScheduler):
            assert value.state_dict() == got[name].state_dict(), name
    for name in ("history", "total", "step", "running"):
        if name in expected:
            assert got[name] == expected[name], name


def _assert_tree(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_tree(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def _choose(points: list[SafePoint]) -> dict[str, int]:
    """Indices of the safe points worth interrupting at."""
    depth = [len(p.positions) for p in points]
    outer = [i for i, d in enumerate(depth) if d == 1]
    inner = [i for i, d in enumerate(depth) if d > 1]
    return {"first": 0, "mid-epoch": inner[len(inner) // 2], "epoch-boundary": outer[0], "last": len(points) - 1}


def check_resume(source: str, where: str | int) -> tuple[dict, LoopRuntime]:
    expected = run_plain(source)
    _, all_points, _, _ = run_guarded(source)
    stop_at = where if isinstance(where, int) else _choose(all_points)[where]
    _, _, taken, _ = run_guarded(source, stop_at=stop_at)
    assert taken is not None
    resumed, _, _, runtime = run_guarded(source, plan=ResumePlan(taken["positions"]), snapshot=taken)
    assert runtime.resumed
    assert_same(expected, resumed)
    return resumed, runtime


@pytest.mark.parametrize("where", ["first", "mid-epoch", "epoch-boundary", "last"])
def test_nested_enumerate_resumes_exactly(where: str) -> None:
    check_resume(NESTED_ENUMERATE.replace("WORKERS", "0"), where)


@pytest.mark.parametrize("where", ["mid-epoch", "last"])
def test_tqdm_trange_and_break_resume_exactly(where: str) -> None:
    check_resume(TQDM_BREAK, where)


@pytest.mark.parametrize("where", ["first", "mid-epoch", "epoch-boundary"])
def test_enumerate_tqdm_and_zip_resume_exactly(where: str) -> None:
    check_resume(ENUMERATE_TQDM_ZIP, where)


@pytest.mark.parametrize("where", [3, 9, 12])
def test_while_steps_resume_exactly(where: int) -> None:
    check_resume(WHILE_STEPS, where)


@pytest.mark.parametrize("persistent", [False, True])
def test_worker_loaders_resume_exactly_without_loading_skipped_batches(persistent: bool) -> None:
    source = WORKERS_CELL.replace("PERSISTENT", str(persistent))
    # After 5 batches of the second epoch: with persistent workers the original run reused its
    # iterator there, so the resumed run must not draw the base seed its new iterator draws.
    resumed, runtime = check_resume(source, 12 + 1 + 4)
    assert runtime.resumed_with_workers and runtime.resume_warnings
    # The 5 skipped batches were never loaded: 7 batches of epoch 1 and 12 of epoch 2, 4 samples each.
    assert resumed["loader"].dataset.hits.sum().item() == 4 * (7 + 12)


def test_skipping_900_batches_loads_none_of_them() -> None:
    source = '''
torch.manual_seed(0)
loader = DataLoader(Points(1000, noisy=False), batch_size=1, shuffle=True)
seen = []
for epoch in range(2):
    for i, (x, y) in enumerate(loader):
        seen.append(int(x.sum() * 1000))
'''
    expected = run_plain(source)
    _, _, taken, _ = run_guarded(source, stop_at=1000 + 1 + 899)  # epoch 0, its end, then 900 batches
    assert [p.completed for p in taken["positions"]] == [1, 900]
    resumed, _, _, _ = run_guarded(source, plan=ResumePlan(taken["positions"]), snapshot=taken)
    assert resumed["loader"].dataset.hits.sum().item() == 100  # only the batches after the resume point
    assert resumed["seen"] == expected["seen"]


def test_completed_plan_skips_every_loop_and_restores_once() -> None:
    source = NESTED_ENUMERATE.replace("WORKERS", "0") + "after = len(history)\n"
    expected = run_plain(source)
    _, points, taken, _ = run_guarded(source, stop_at=None)
    final = _snapshot(run_plain(source))
    calls = []
    cell = instrument_cell(source)
    ns = _fresh_namespace()
    runtime = LoopRuntime(cell, on_safe_point=lambda p: None, resume=ResumePlan(completed=True),
                          on_resume=lambda: (calls.append(1), _restore(ns, final)))
    with runtime.active():
        runtime.execute(ns)
    assert calls == [1]
    assert ns["after"] == 3 and ns["loader"].dataset.hits.sum().item() == 0
    assert_same(expected, ns)
    assert points and taken is None


@pytest.mark.skipif(sys.platform == "win32", reason="fork-based workers")
def test_num_workers_flag_is_off_without_workers() -> None:
    _, runtime = check_resume(NESTED_ENUMERATE.replace("WORKERS", "0"), "mid-epoch")
    assert not runtime.resumed_with_workers and runtime.resume_warnings == []


@pytest.mark.parametrize(("loader", "per_batch"), [
    ("DataLoader(data, batch_size=3)", 3),
    ("DataLoader(data, batch_size=3, shuffle=True, drop_last=True, generator=g)", 3),
    ("DataLoader(data, batch_size=None, shuffle=True)", 1),
    ("DataLoader(data, batch_sampler=torch.utils.data.BatchSampler("
     "torch.utils.data.RandomSampler(data, replacement=True, num_samples=30, generator=g), 4, drop_last=False))", 4),
])
def test_samplers_skip_the_same_indices_without_loading(loader: str, per_batch: int) -> None:
    source = f'''
torch.manual_seed(0)
g = torch.Generator().manual_seed(5)  # births must hold every generator a loader or sampler uses
data = Points(30, noisy=False)
loader = {loader}
seen = []
for epoch in range(2):
    for i, (x, y) in enumerate(loader):
        seen.append(x.sum().item())
'''
    expected = run_plain(source)
    batches = len(expected["loader"])
    _, _, taken, _ = run_guarded(source, stop_at=batches + 1 + 2)  # after 3 batches of epoch 1
    resumed, _, _, _ = run_guarded(source, plan=ResumePlan(taken["positions"]), snapshot=taken)
    assert resumed["seen"] == expected["seen"]
    loaded = resumed["loader"].dataset.hits.sum().item()
    assert 0 < loaded <= (batches - 3) * per_batch  # only what came after the resume point
