"""Every snapshot holds the bytes each tensor had at its save, whatever wrote them: native kernels
that do not bump version counters (BatchNorm's running statistics), functional calls, compiled
models, raw pointers. Each test compares a snapshot, byte for byte, with a copy of the live state
taken at that save."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nbguard import Guard
from nbguard.errors import StaleCaptureError

pytestmark = pytest.mark.usefixtures("fixed_rng")


def live_copy(state: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the state, as bytes, keyed like the snapshot's tensors."""
    out = {}
    for name, obj in state.items():
        tensors = obj.state_dict() if isinstance(obj, nn.Module) else obj
        for key, value in tensors.items():
            if isinstance(value, torch.Tensor):
                out[f"{name}/{key}"] = value.detach().clone()
    return out


def assert_snapshot_is(guard: Guard, expected: dict[str, torch.Tensor]) -> None:
    snapshot = guard.load()
    for key, value in expected.items():
        stored = snapshot.tensor(key)
        assert stored.dtype == value.dtype and stored.shape == value.shape, key
        assert torch.equal(stored.view(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), \
            f"{key} in the snapshot is not what it was at the save"


def cnn(frozen_backbone: bool = False) -> nn.Sequential:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )
    if frozen_backbone:
        for layer in list(model)[:6]:
            for p in layer.parameters():
                p.requires_grad_(False)
    return model


def train_step(model: nn.Module, opt: torch.optim.Optimizer, shape=(4, 3, 8, 8)) -> None:
    model.train()
    loss = model(torch.randn(*shape)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("wait", [True, False], ids=["wait", "background"])
def test_batchnorm2d_running_statistics_are_saved_as_they_are_at_each_save(tmp_path, wait):
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(tmp_path, run="bn", report=None)
    for _ in range(5):
        train_step(model, opt)
        expected = live_copy({"model": model})
        handle = guard.save({"model": model, "opt": opt}, wait=wait)
        assert handle.wait(60) and handle.exception() is None
        assert_snapshot_is(guard, expected)


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, nn.SyncBatchNorm])  # SyncBatchNorm: unsynchronised here
def test_batchnorm1d_statistics_reach_the_snapshot(tmp_path, norm):
    model = nn.Sequential(nn.Linear(6, 5), norm(5), nn.Linear(5, 1))
    opt = torch.optim.Adam(model.parameters())
    guard = Guard(tmp_path, run="bn1d", report=None)
    for _ in range(4):
        train_step(model, opt, shape=(8, 6))
        expected = live_copy({"model": model})
        guard.save({"model": model, "opt": opt}, wait=True)
        assert_snapshot_is(guard, expected)


def test_a_frozen_backbone_with_batchnorm_in_train_mode_keeps_its_statistics_and_its_savings(tmp_path):
    model = cnn(frozen_backbone=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    guard = Guard(tmp_path, run="frozen", report=None)
    frozen_weights = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    for i in range(4):
        train_step(model, opt)
        expected = live_copy({"model": model})
        guard.save({"model": model, "opt": opt}, wait=True)
        assert_snapshot_is(guard, expected)
        if i:
            # The frozen weights are still neither copied nor written; their statistics are.
            assert guard.last_stats.reused_bytes >= frozen_weights


def test_functional_batch_norm_on_plain_tensors_is_caught_and_the_save_retaken(tmp_path):
    """F.batch_norm writes running statistics that are not module buffers, without a version bump:
    the writer's check finds it, the snapshot is not kept, and the retake holds the right bytes."""
    stats = {"mean": torch.zeros(4), "var": torch.ones(4)}
    guard = Guard(tmp_path, run="fbn", report=None)
    retakes = []
    guard.on_retake = lambda: retakes.append(1)
    F.batch_norm(torch.randn(8, 4), stats["mean"], stats["var"], training=True)
    guard.save({"stats": stats}, wait=True)
    F.batch_norm(torch.randn(8, 4), stats["mean"], stats["var"], training=True)
    expected = {f"stats/{k}": v.clone() for k, v in stats.items()}

    handle = guard.save({"stats": stats})  # background: the stale candidate is caught before the commit
    assert handle.wait(60)
    assert isinstance(handle.exception(), StaleCaptureError)
    assert guard.retake_due and retakes == [1]
    assert guard.load().manifest["id"] != handle.id  # nothing stale was committed

    guard.save({"stats": stats}, wait=True)  # the retake at the next safe point copies them
    assert not guard.retake_due
    assert_snapshot_is(guard, expected)
    F.batch_norm(torch.randn(8, 4), stats["mean"], stats["var"], training=True)
    expected = {f"stats/{k}": v.clone() for k, v in stats.items()}
    guard.save({"stats": stats}, wait=True)  # wait=True retakes at once, invisibly
    assert_snapshot_is(guard, expected)


def test_instance_norm_with_running_statistics(tmp_path):
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.InstanceNorm1d(3, track_running_stats=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(tmp_path, run="in", report=None)
    for _ in range(3):
        train_step(model, opt, shape=(4, 2, 9))
        expected = live_copy({"model": model})
        guard.save({"model": model, "opt": opt}, wait=True)
        assert_snapshot_is(guard, expected)


def test_functional_call_with_the_modules_own_buffers(tmp_path):
    from torch.func import functional_call

    model = cnn()
    guard = Guard(tmp_path, run="func", report=None)
    for _ in range(3):
        functional_call(model, {**dict(model.named_parameters()), **dict(model.named_buffers())},
                        (torch.randn(2, 3, 8, 8),))
        expected = live_copy({"model": model})
        guard.save({"model": model}, wait=True)
        assert_snapshot_is(guard, expected)


def test_embedding_with_max_norm_renormalises_rows_in_place(tmp_path):
    emb = nn.Embedding(20, 6, max_norm=1.0)
    with torch.no_grad():
        emb.weight.mul_(5)
    guard = Guard(tmp_path, run="emb", report=None)
    guard.save({"emb": emb}, wait=True)
    for rows in ([1, 2], [3, 4, 5]):
        emb(torch.tensor(rows))
        expected = live_copy({"emb": emb})
        guard.save({"emb": emb}, wait=True)
        assert_snapshot_is(guard, expected)


def test_a_write_through_a_raw_pointer_reaches_the_next_snapshot(tmp_path):
    model = cnn(frozen_backbone=True)
    guard = Guard(tmp_path, run="ptr", report=None)
    guard.save({"model": model}, wait=True)
    guard.save({"model": model}, wait=True)
    weight = model[0].weight
    patch = torch.full((4,), 42.0)
    ctypes.memmove(weight.data_ptr() + 8, patch.data_ptr(), 16)  # what a C extension might do
    assert weight.view(-1)[2].item() == 42.0
    expected = live_copy({"model": model})
    guard.save({"model": model}, wait=True)
    assert_snapshot_is(guard, expected)


def test_buffers_changed_by_nothing_are_not_written_again(tmp_path):
    """Module buffers are copied at every save, but written only when their bytes changed."""
    model = cnn()
    model.eval()
    guard = Guard(tmp_path, run="eval", report=None)
    first = guard.save({"model": model}, wait=True).result()
    model(torch.randn(2, 3, 8, 8))  # eval mode: the statistics are read, not written
    second = guard.save({"model": model}, wait=True).result()
    stored = [guard.catalog.get(s.id, "eval").manifest["storages"] for s in (first, second)]
    assert any("running_mean" in key for key in stored[0])
    for key, entry in stored[0].items():
        if key.startswith("model/"):
            assert stored[1][key] == entry, f"{key} was written again"


@pytest.mark.e2e
def test_a_compiled_model_with_batchnorm(tmp_path):
    model = cnn()
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(tmp_path, run="compiled", report=None)
    for _ in range(3):
        loss = compiled(torch.randn(4, 3, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        expected = live_copy({"model": model})
        guard.save({"model": model, "opt": opt}, wait=True)
        assert_snapshot_is(guard, expected)


def test_nbguard_leaves_torch_as_it_was(tmp_path):
    """Neither importing nbguard nor saving with it replaces anything on torch.Tensor."""
    code = f"""
import torch
names = ("data", "numpy", "__array__", "untyped_storage", "__dlpack__", "data_ptr")
before = {{n: torch.Tensor.__dict__.get(n, getattr(torch.Tensor, n)) for n in names}}
import nbguard
guard = nbguard.Guard({str(tmp_path)!r}, report=None)
model = torch.nn.Linear(3, 3)
guard.save({{"model": model}}, wait=True)
guard.save({{"model": model}}, wait=True)
guard.close()
after = {{n: torch.Tensor.__dict__.get(n, getattr(torch.Tensor, n)) for n in names}}
print("REPLACED", [n for n in names if before[n] is not after[n]])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "REPLACED []" in out.stdout.splitlines(), out.stdout + out.stderr
