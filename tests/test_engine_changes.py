"""Saving changes nothing it captures; unchanged tensors cost nothing; every way of changing a
tensor is seen by the next snapshot."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nbguard import Guard
from nbguard.format.blobfile import blob_path, parse_header

pytestmark = pytest.mark.usefixtures("fixed_rng")


# -- saving changes nothing ------------------------------------------------------------------------
class DrawsInStateDict:
    """A stateful object whose state_dict() consumes every global random stream."""

    def __init__(self):
        self.calls = 0

    def state_dict(self):
        self.calls += 1
        return {"t": torch.rand(3), "py": random.random(), "np": float(np.random.rand())}

    def load_state_dict(self, state):
        pass


def draws():
    return torch.rand(5).tolist(), [random.random() for _ in range(3)], np.random.rand(3).tolist()


def test_a_save_leaves_every_random_stream_where_it_was(tmp_path):
    obj = DrawsInStateDict()
    guard = Guard(tmp_path / "ckpt", run="rng", report=None)
    torch.rand(7)  # move the streams off their seeds
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state())

    guard.save({"obj": obj, "more": DrawsInStateDict()}, wait=True)
    assert obj.calls == 1
    after_save = draws()

    torch.set_rng_state(states[0])
    random.setstate(states[1])
    np.random.set_state(states[2])
    assert draws() == after_save, "a save shifted a random stream"

    # The snapshot recorded the state from before the save: restoring only the generators
    # replays the same numbers.
    report = guard.load().restore({}, only=[])
    assert set(report.rng) >= {"python", "numpy", "torch"}
    assert draws() == after_save


def test_a_save_leaves_parameters_exactly_as_they_were(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model.to(memory_format=torch.channels_last)
    model[0].weight.requires_grad_(False)
    model[3].to(torch.float64)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)

    def loss_of():
        h = model[:3](x)
        return model[3](h.double()).sum()

    loss_of().backward()
    opt.step()

    def facts():
        return {name: (p.requires_grad, p.device, p.dtype, p.stride(), p.is_leaf, p._version,
                       None if p.grad is None else p.grad.clone(), p.detach().clone())
                for name, p in list(model.named_parameters()) + list(model.named_buffers())}

    loss = loss_of()  # the graph holds saved tensors: a save must not invalidate them
    before = facts()
    guard = Guard(tmp_path / "ckpt", run="params", report=None)
    guard.save({"model": model, "opt": opt}, wait=True)
    loss.backward()  # raises if the save bumped a version counter autograd depends on
    after = facts()
    for name, old in before.items():
        new = after[name]
        assert old[:6] == new[:6], f"{name} changed: {old[:6]} -> {new[:6]}"
        assert torch.equal(old[7], new[7])
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)


# -- unchanged tensors are free ----------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(256, 256)
        self.head = nn.Linear(256, 10)
        self.backbone.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.relu(self.backbone(x)))


def make_run(tmp_path, **kwargs):
    net = Net()
    opt = torch.optim.Adam(net.head.parameters(), lr=1e-2)
    guard = Guard(tmp_path / "ckpt", run="frozen", report=None, **kwargs)
    return net, opt, guard


def step(net, opt):
    F.cross_entropy(net(torch.randn(8, 256)), torch.randint(0, 10, (8,))).backward()
    opt.step()
    opt.zero_grad()


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def rng_bytes(manifest):
    return sum(manifest["storages"][manifest["tensors"][k]["storage"]]["nbytes"]
               for k in manifest["tensors"] if k.startswith("rng/"))


def new_blobs(guard, older, newer):
    a = {s["blob"] for s in guard.catalog.get(older, "frozen").manifest["storages"].values()}
    b = {s["blob"] for s in guard.catalog.get(newer, "frozen").manifest["storages"].values()}
    return b - a


def test_unchanged_frozen_layers_are_neither_copied_nor_written(tmp_path):
    net, opt, guard = make_run(tmp_path)
    step(net, opt)
    previous = guard.save({"model": net, "opt": opt}, wait=True).result()
    backbone = nbytes(net.backbone.weight, net.backbone.bias)
    head = nbytes(net.head.weight, net.head.bias)
    assert guard.last_stats.staged_bytes >= backbone + 3 * head

    for _ in range(3):
        step(net, opt)
        info = guard.save({"model": net, "opt": opt}, wait=True).result()
        manifest = guard.load().manifest
        optimizer_state = 2 * head + 2 * 4  # exp_avg, exp_avg_sq, and two 0-d float32 step counters
        assert guard.last_stats.staged_bytes == head + optimizer_state + rng_bytes(manifest)
        assert guard.last_stats.reused_bytes == backbone
        assert info.size == backbone + head + optimizer_state + rng_bytes(manifest)

        (blob,) = new_blobs(guard, previous.id, info.id)
        data = guard.store.read(blob_path(blob))
        assert info.written == len(data) == guard.last_stats.written_bytes
        written_entries = set(parse_header(data).entries)
        assert not any(name.startswith("model/backbone") for name in written_entries)
        assert {"model/head.weight", "model/head.bias"} <= written_entries
        assert info.written < backbone
        previous = info

    fresh = Net()
    guard.restore({"model": fresh})
    for name, value in net.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name]), name


def test_without_change_tracking_everything_is_copied(tmp_path):
    net, opt, guard = make_run(tmp_path, track_changes=False)
    step(net, opt)
    guard.save({"model": net, "opt": opt}, wait=True)
    step(net, opt)
    guard.save({"model": net, "opt": opt}, wait=True)
    assert guard.last_stats.reused_bytes == 0
    assert guard.last_stats.staged_bytes >= nbytes(net.backbone.weight, net.backbone.bias)


def change_through_data(net, kept):
    net.backbone.weight.data.add_(1)


def change_through_copy_under_no_grad(net, kept):
    with torch.no_grad():
        net.backbone.weight.copy_(torch.full_like(net.backbone.weight, 0.25))


def change_through_numpy(net, kept):
    net.backbone.weight.detach().numpy()[:] = 0


def change_through_a_kept_data_view(net, kept):
    kept.mul_(2)


def change_through_data_assignment(net, kept):
    net.backbone.weight.data = torch.full_like(net.backbone.weight, -3.0)


def change_through_a_slice_under_no_grad(net, kept):
    with torch.no_grad():
        net.backbone.weight[3:5].fill_(7)


CHANGES = [change_through_data, change_through_copy_under_no_grad, change_through_numpy,
           change_through_a_kept_data_view, change_through_a_slice_under_no_grad, change_through_data_assignment]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.removeprefix("change_through_"))
def test_every_way_of_changing_a_frozen_tensor_reaches_the_next_snapshot(tmp_path, change):
    net, opt, guard = make_run(tmp_path)
    kept = net.backbone.weight.data  # held across snapshots, as some training code does
    step(net, opt)
    guard.save({"model": net, "opt": opt}, wait=True)
    step(net, opt)
    guard.save({"model": net, "opt": opt}, wait=True)
    assert guard.last_stats.reused_bytes > 0  # the backbone is skipped while unchanged

    change(net, kept)
    expected = net.backbone.weight.detach().clone()
    guard.save({"model": net, "opt": opt}, wait=True)
    assert guard.last_stats.staged_bytes >= nbytes(net.backbone.weight)

    fresh = Net()
    guard.restore({"model": fresh}, rng=False)
    assert torch.equal(fresh.backbone.weight, expected)
    assert torch.equal(fresh.backbone.bias, net.backbone.bias)


@pytest.mark.parametrize("change", [change_through_data, change_through_copy_under_no_grad],
                         ids=["data", "copy_under_no_grad"])
def test_once_a_change_is_saved_the_tensor_is_free_again(tmp_path, change):
    net, opt, guard = make_run(tmp_path)
    step(net, opt)
    guard.save({"model": net, "opt": opt}, wait=True)
    change(net, None)
    guard.save({"model": net, "opt": opt}, wait=True)
    # A write behind the version counter (.data) makes the next save copy the tensor once more; a
    # save that finds it unchanged trusts its counter again.
    guard.save({"model": net, "opt": opt}, wait=True)
    guard.save({"model": net, "opt": opt}, wait=True)
    assert guard.last_stats.staged_bytes == rng_bytes(guard.load().manifest)  # the generators only


def test_compare_shows_what_changed_between_two_snapshots(tmp_path):
    net, opt, guard = make_run(tmp_path)
    step(net, opt)
    a = guard.save({"model": net, "opt": opt}, metrics={"loss": 2.0}, wait=True).result()
    step(net, opt)
    b = guard.save({"model": net, "opt": opt}, metrics={"loss": 1.5}, wait=True).result()
    comparison = guard.catalog.compare(a.id, b.id, "frozen")
    changed = {name for name, _, _ in comparison.changed}
    assert {"model/head.weight", "model/head.bias"} <= changed
    assert {"model/backbone.weight", "model/backbone.bias"} <= set(comparison.unchanged)
    assert comparison.metrics == [("loss", 2.0, 1.5)]
    assert comparison.only_in_a == comparison.only_in_b == []
    max_abs = dict((n, m) for n, m, _ in comparison.changed)["model/head.weight"]
    old = guard.catalog.get(a.id, "frozen").tensor("model/head.weight")
    assert max_abs == pytest.approx(float((net.head.weight.detach() - old).abs().max()))
    assert "tensors changed" in comparison.describe()


# -- memory torch does not own ----------------------------------------------------------------------
def test_a_numpy_array_changed_in_place_is_saved_again(tmp_path):
    """Plain numpy values (a loss log, a replay buffer) are written in place by NumPy, which no
    version counter sees: the next snapshot must still hold the new values."""
    losses = np.zeros(1000, dtype=np.float32)
    guard = Guard(tmp_path / "ckpt", run="numpy", report=None)
    guard.save({"losses": losses}, wait=True)
    losses[5] = 1.5
    guard.save({"losses": losses}, wait=True)
    assert guard.load().value("losses")[5] == 1.5
    losses[6:] = 2.0
    guard.save({"losses": losses}, wait=True)
    assert np.array_equal(guard.restore().values["losses"], losses)


@pytest.mark.parametrize("wrap", [torch.from_numpy, torch.as_tensor,
                                  lambda a: torch.frombuffer(a, dtype=torch.float32)],
                         ids=["from_numpy", "as_tensor", "frombuffer"])
def test_a_tensor_over_numpy_memory_changed_through_numpy_is_saved_again(tmp_path, wrap):
    array = np.zeros(1000, dtype=np.float32)
    tensor = wrap(array)
    guard = Guard(tmp_path / "ckpt", run="shared", report=None)
    guard.save({"t": tensor}, wait=True)
    array[:10] = 3.0
    guard.save({"t": tensor}, wait=True)
    assert torch.equal(guard.load().value("t"), tensor)


def test_two_guards_in_one_process_both_see_a_write_through_data(tmp_path):
    """A save by one Guard must not hide a .data write from another."""
    from nbguard import Guard, load

    model = nn.Linear(16, 16)
    a = Guard(tmp_path / "a", run="a", report=None)
    b = Guard(tmp_path / "b", run="b", report=None)
    a.save({"model": model}, wait=True)
    b.save({"model": model}, wait=True)
    model.weight.data.add_(1)
    b.save({"model": model}, wait=True)
    a.save({"model": model}, wait=True)
    assert a.last_stats.written_bytes > 0
    fresh = nn.Linear(16, 16)
    load(tmp_path / "a", run="a").restore({"model": fresh})
    assert torch.equal(fresh.weight, model.weight)


def test_prepared_staging_memory_is_what_the_first_save_copies_into(tmp_path):
    """Guard.prepare (called as a guarded run starts) allocates and faults in the staging buffers in
    the background; the first save then copies into those, not into fresh memory."""
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64))
    guard = Guard(tmp_path, run="prep", report=None)
    guard.prepare({"model": model}, wait=True)
    prepared = {key: buffer for key, buffer in guard._staging._buffers.items()}
    assert sum(b.numel() for b in prepared.values()) >= sum(t.numel() * t.element_size() for t in model.state_dict().values())
    guard.save({"model": model}, wait=True)
    after = guard._staging._buffers
    assert all(after[key] is buffer for key, buffer in prepared.items())
    fresh = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64))
    guard.restore({"model": fresh}, rng=False)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))


def test_prepare_starts_the_writer_thread_the_first_save_then_uses(tmp_path):
    """Starting a thread costs the first save's stall ~2 ms on 2 busy cores: prepare starts it."""
    model = nn.Linear(8, 8)
    guard = Guard(tmp_path, run="prep", report=None)
    guard.prepare({"model": model}, wait=True)
    writer = guard._writer._thread
    assert writer is not None and writer.is_alive()
    guard.save({"model": model}, wait=True)
    assert guard._writer._thread is writer
    guard.close()
    assert not writer.is_alive()
    guard.prepare({"model": model})  # a closed guard starts nothing
    assert not guard._writer._thread.is_alive()


def test_a_resume_makes_staging_ready_for_what_the_restore_created(tmp_path):
    """A new process resuming has an optimizer without state until the restore creates it; the
    guard's prepare (started before the restore) cannot know it. The restore makes staging ready for
    it in the background, so the first save after a resume copies into warm buffers like any other."""
    model = nn.Linear(64, 64)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    Guard(tmp_path, run="r", report=None).save({"model": model, "opt": opt}, wait=True)

    fresh = nn.Linear(64, 64)
    fresh_opt = torch.optim.Adam(fresh.parameters())
    assert not fresh_opt.state  # what prepare sees in a new process
    state = {"model": fresh, "opt": fresh_opt}
    guard = Guard(tmp_path, run="r", report=None)
    guard.prepare(state)
    guard.restore(state, rng=False)
    guard._staging.wait_prefault()
    ready = dict(guard._staging._buffers)
    for name in ("exp_avg", "exp_avg_sq"):
        restored = fresh_opt.state[fresh.weight][name]
        assert torch.equal(restored, opt.state[model.weight][name])
        assert ready[f"opt/state/0/{name}"].numel() == restored.numel() * restored.element_size()
    guard.save(state, wait=True)
    assert all(guard._staging._buffers[key] is buffer for key, buffer in ready.items())  # nothing allocated anew


def test_a_prefault_follows_the_one_running_and_replaces_buffers_of_another_size():
    from nbguard.engine.staging import StagingArea

    area = StagingArea()
    first = {"a": torch.ones(1 << 20), "b": torch.ones(1 << 18)}
    area._buffers["b"] = torch.empty(3, dtype=torch.uint8)  # left from a state of another shape
    area.prefault(first)
    area.prefault({"c": torch.ones(1 << 16)})  # returns at once, runs after the first
    area.wait_prefault()
    assert {k: b.numel() for k, b in area._buffers.items()} == {"a": 4 << 20, "b": 4 << 18, "c": 4 << 16}
    kept = dict(area._buffers)
    area.prefault(first)  # everything ready: nothing allocated
    area.wait_prefault()
    assert all(area._buffers[k] is b for k, b in kept.items())


def test_a_restore_that_succeeded_is_not_failed_by_the_staging_warm_up_after_it(tmp_path, monkeypatch):
    import nbguard.engine.guard as guard_module

    model = nn.Linear(8, 8)
    Guard(tmp_path, run="r", report=None).save({"model": model}, wait=True)
    fresh = nn.Linear(8, 8)
    guard = Guard(tmp_path, run="r", report=None)

    def broken(*args, **kwargs):
        raise RuntimeError("a state this warm-up cannot read")

    monkeypatch.setattr(guard_module, "capture", broken)
    guard.restore({"model": fresh}, rng=False)
    assert torch.equal(fresh.weight, model.weight)
