"""CUDA paths: staging through reused pinned buffers, restore onto the device, CUDA RNG, AMP scaler.

Skipped where no GPU is present (CI); run them on a machine with one:
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

import nbguard

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _train_state(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    return model, opt, scaler


def _step(model, opt, scaler) -> float:
    x = torch.randn(32, 64, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.item()


def test_cuda_training_resumes_bit_for_bit(tmp_path):
    model, opt, scaler = _train_state()
    for _ in range(5):
        _step(model, opt, scaler)
    guard = nbguard.Guard(tmp_path, run="cuda")
    guard.save({"model": model, "opt": opt, "scaler": scaler}, wait=True)
    reference = [_step(model, opt, scaler) for _ in range(5)]
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, scaler2 = _train_state(seed=1)
    guard.restore({"model": model2, "opt": opt2, "scaler": scaler2})
    assert all(p.is_cuda for p in model2.parameters())
    assert all(v.is_cuda for st in opt2.state.values() for k, v in st.items() if k != "step")
    resumed = [_step(model2, opt2, scaler2) for _ in range(5)]
    assert resumed == reference
    assert all(torch.equal(expected[k], v) for k, v in model2.state_dict().items())
    guard.close()


def test_cuda_staging_reuses_pinned_buffers(tmp_path):
    model, opt, scaler = _train_state()
    _step(model, opt, scaler)
    guard = nbguard.Guard(tmp_path, run="cuda")
    state = {"model": model, "opt": opt}
    guard.save(state, wait=True)
    # Adam's step counters and the RNG states live on the CPU: only device tensors go through pinned buffers.
    buffers = {k: b for k, b in guard._staging._buffers.items()
               if k.startswith("model/") or k.endswith(("/exp_avg", "/exp_avg_sq"))}
    assert buffers and all(b.is_pinned() for b in buffers.values())
    _step(model, opt, scaler)
    guard.save(state, wait=True)
    assert all(guard._staging._buffers[k] is b for k, b in buffers.items())
    # Nothing changed on the device: nothing is copied again (only the RNG states, read anew each save).
    guard.save(state, wait=True)
    manifest = guard.load().manifest
    rng = {manifest["tensors"][k]["storage"] for k in manifest["tensors"] if k.startswith("rng/")}
    assert guard.last_stats.staged_bytes == sum(manifest["storages"][k]["nbytes"] for k in rng)
    guard.close()


def test_cuda_snapshot_restores_on_cpu(tmp_path):
    model, opt, scaler = _train_state()
    _step(model, opt, scaler)
    guard = nbguard.Guard(tmp_path, run="cuda")
    guard.save({"model": model}, wait=True)
    cpu_model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    nbguard.load(tmp_path, run="cuda").restore({"model": cpu_model})
    for (_, a), (_, b) in zip(cpu_model.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b.cpu())
    guard.close()


def test_cuda_rng_is_restored(tmp_path):
    torch.cuda.manual_seed(3)
    torch.randn(4, device="cuda")
    guard = nbguard.Guard(tmp_path, run="cuda")
    guard.save({}, wait=True)
    expected = torch.randn(8, device="cuda")
    torch.randn(100, device="cuda")
    guard.restore({})
    assert torch.equal(torch.randn(8, device="cuda"), expected)
    guard.close()
