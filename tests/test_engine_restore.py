"""Restore is all or nothing, refuses silent conversions, never replaces what a notebook needs,
and fills the live tensors in place (issue 14 items 3-4, issue 17 item 2).

Every failure shape uses real objects (a real GradScaler, scheduler, module hooks) and real files.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import nbguard
from nbguard import Guard, RestoreError
from nbguard.errors import CorruptSnapshotError
from nbguard.format.blobfile import blob_path
from nbguard.format.manifest import checksum_of
from tests.test_engine_hostile import (
    RUN,
    Live,
    edit_manifest,
    flip_byte_in_entry,
    make_snapshots,
    manifest_file,
    storage_of,
)

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("fixed_rng")


def global_rng() -> tuple:
    return random.getstate(), repr(np.random.get_state()), torch.get_rng_state()


def assert_same_rng(before: tuple) -> None:
    after = global_rng()
    assert after[0] == before[0] and after[1] == before[1] and torch.equal(after[2], before[2]), \
        "a random generator was changed"


def latest_manifest(store_dir: Path) -> tuple[str, dict]:
    snapshot = nbguard.load(store_dir, "latest", run=RUN)
    return snapshot.id, json.loads(manifest_file(store_dir, snapshot.id).read_bytes())


# -- all or nothing (14.3) ---------------------------------------------------------------------------
def test_a_gradscaler_saved_disabled_refuses_an_enabled_one_and_nothing_changes(tmp_path):
    """AMP switched on between save and restore: the scaler's load_state_dict raises after the model,
    optimizer, scheduler, generator, values and RNG would have been applied."""
    store_dir = tmp_path / "store"
    guard, _ = make_snapshots(store_dir)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    guard.save({"model": model, "opt": opt, "sched": torch.optim.lr_scheduler.StepLR(opt, 3),
                "gen": torch.Generator().manual_seed(1), "history": [9], "weights": torch.ones(4),
                "scaler": torch.amp.GradScaler("cpu", enabled=False)}, wait=True).result()
    live = Live()
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    rng_before = global_rng()
    with pytest.raises(RestoreError) as raised:
        Guard(store_dir, run=RUN, report=None).restore(live.objects() | {"scaler": scaler}, namespace=live.namespace)
    message = str(raised.value)
    assert message.startswith("scaler refused the snapshot's state") and "disabled instance of GradScaler" in message
    assert "Nothing was restored" in message
    live.assert_untouched()
    assert scaler.state_dict()["scale"] == 1024.0
    assert_same_rng(rng_before)


def test_a_malformed_scheduler_state_is_refused_and_nothing_changes(tmp_path):
    """The scheduler's tree decodes (a list instead of a dict) but its load_state_dict raises."""
    store_dir = tmp_path / "store"
    make_snapshots(store_dir)
    snapshot_id, _ = latest_manifest(store_dir)
    edit_manifest(store_dir, snapshot_id, lambda m: m["objects"]["sched"].update(tree=[1, 2, 3]))
    live = Live()
    rng_before = global_rng()
    with pytest.raises(RestoreError) as raised:
        Guard(store_dir, run=RUN, report=None).restore(live.objects(), namespace=live.namespace)
    assert str(raised.value).startswith("sched refused the snapshot's state")
    live.assert_untouched()
    assert_same_rng(rng_before)


class HalfLoader:
    """A user object whose load_state_dict changes half of itself, then raises."""

    def __init__(self, a: int, b: int):
        self.a, self.b = a, b

    def state_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.a = state["a"]
        if state["b"] > 10:
            raise ValueError("b is too large for this object")
        self.b = state["b"]


def test_an_object_that_fails_halfway_through_its_own_load_is_put_back_too(tmp_path):
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)
    guard.save({"first": HalfLoader(1, 2), "second": HalfLoader(5, 50)}, wait=True).result()
    first, second = HalfLoader(7, 7), HalfLoader(8, 8)
    with pytest.raises(RestoreError, match=r"^second refused .*ValueError: b is too large"):
        guard.restore({"first": first, "second": second})
    assert (first.a, first.b, second.a, second.b) == (7, 7, 8, 8)


def test_a_model_whose_load_hook_raises_gets_its_weights_back(tmp_path):
    """A post-load hook runs after load_state_dict copied the values in: the copy is undone."""
    torch.manual_seed(0)
    saved = nn.Linear(4, 3)
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)
    guard.save({"model": saved, "history": [1]}, wait=True).result()
    live = nn.Linear(4, 3)
    before = {k: v.clone() for k, v in live.state_dict().items()}

    def refuse(module, keys):
        raise RuntimeError("checksum of the weights does not match the deployment")

    live.register_load_state_dict_post_hook(refuse)
    namespace: dict[str, Any] = {"history": ["live"]}
    with pytest.raises(RestoreError, match="^model refused .*checksum of the weights") as raised:
        guard.restore({"model": live}, namespace=namespace)
    assert "putting some state back failed" not in str(raised.value)
    assert all(torch.equal(before[k], v) for k, v in live.state_dict().items())
    assert namespace == {"history": ["live"]}


def _in_place_bytes(manifest: dict) -> int:
    """What goes straight into Live()'s memory: the model's tensors (its optimizer has no state yet)."""
    return sum(manifest["storages"][manifest["tensors"][k]["storage"]]["nbytes"]
               for k in manifest["tensors"] if k.startswith("model/"))


def test_a_file_written_after_checking_is_refused_and_nothing_changes(tmp_path):
    """Bytes that passed their check are changed in their file before they are copied into the
    live tensors: the file's identity (fstat) no longer matches, found before the first live byte
    changes, and everything is put back."""
    store_dir = tmp_path / "store"
    make_snapshots(store_dir)
    _, manifest = latest_manifest(store_dir)
    in_place = _in_place_bytes(manifest)
    live = Live()
    flipped = []

    def progress(done: int, total: int) -> None:
        if not flipped and done == total - in_place:  # every byte checked, nothing applied yet
            flip_byte_in_entry(store_dir, manifest, "model/0.weight")
            flipped.append(True)

    snapshot = nbguard.load(store_dir, "latest", run=RUN)
    with pytest.raises(CorruptSnapshotError, match="written after its bytes were checked. Nothing was restored"):
        snapshot.restore(live.objects(), namespace=live.namespace, progress=progress)
    assert flipped
    live.assert_untouched()


def test_a_blob_replaced_after_checking_is_refused_and_nothing_changes(tmp_path):
    """A blob file renamed over after the check (a new inode at its path; the checked one, kept
    open, is unlinked, which changes its ctime): refused before the first live byte changes."""
    store_dir = tmp_path / "store"
    make_snapshots(store_dir)
    _, manifest = latest_manifest(store_dir)
    in_place = _in_place_bytes(manifest)
    path = store_dir / blob_path(storage_of(manifest, "model/0.weight")["blob"])
    live = Live()
    replaced = []

    def progress(done: int, total: int) -> None:
        if not replaced and done == total - in_place:
            damaged = bytearray(path.read_bytes())
            damaged[-1] ^= 0x40
            (tmp_path / "new").write_bytes(bytes(damaged))
            os.replace(tmp_path / "new", path)
            replaced.append(True)

    with pytest.raises(CorruptSnapshotError, match="replaced or written after its bytes were checked"):
        nbguard.load(store_dir, "latest", run=RUN).restore(live.objects(), namespace=live.namespace, progress=progress)
    assert replaced
    live.assert_untouched()


def test_a_file_changed_while_copying_is_reported_and_the_rest_put_back(tmp_path):
    """The one step that cannot be undone: a file changes after the first storage was copied into
    the live tensors. The error says so and names the object; the rest is put back."""
    store_dir = tmp_path / "store"
    make_snapshots(store_dir)
    _, manifest = latest_manifest(store_dir)
    in_place = _in_place_bytes(manifest)
    live = Live()
    sched_before = live.sched.state_dict()
    flipped = []

    def progress(done: int, total: int) -> None:
        if not flipped and total - in_place < done < total:  # copying into the model's memory
            flip_byte_in_entry(store_dir, manifest, "model/1.running_var")
            flipped.append(True)

    snapshot = nbguard.load(store_dir, "latest", run=RUN)
    with pytest.raises(CorruptSnapshotError, match="model is partly restored, everything else is as it was"):
        snapshot.restore(live.objects(), namespace=live.namespace, progress=progress)
    assert flipped
    assert live.sched.state_dict() == sched_before
    assert live.namespace["history"] == ["live"]
    assert torch.equal(live.gen.get_state(), live._record[3])


# -- odd values (14.4) -----------------------------------------------------------------------------------
@pytest.mark.parametrize("saved, live", [(torch.float32, torch.float16), (torch.bfloat16, torch.float32),
                                         (torch.complex64, torch.float32)], ids=str)
def test_a_dtype_change_is_refused_before_anything_changes(tmp_path, saved, live):
    torch.manual_seed(0)
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)
    guard.save({"model": nn.Linear(4, 3, dtype=saved)}, wait=True).result()
    model = nn.Linear(4, 3, dtype=live)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RestoreError) as raised:
        guard.restore({"model": model})
    assert f"model.weight is {saved} in the snapshot but {live} in your model" in str(raised.value)
    assert "state_dict(name)" in str(raised.value)  # the way to convert on purpose
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_dtype_change_of_optimizer_state_is_refused(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)
    guard.save({"opt": opt}, wait=True).result()
    half = nn.Linear(4, 3).half()
    with pytest.raises(RestoreError, match=r"saved exp_avg of parameter 0 is torch.float32 in the snapshot but torch.float16"):
        guard.restore({"opt": torch.optim.Adam(half.parameters())})


def test_the_shape_is_checked_before_a_byte_of_a_large_entry_is_read(tmp_path):
    """A [3,4] weight pointing at a 64 MiB entry is refused from the manifest and the blob header."""
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)
    guard.save({"model": nn.Linear(4, 3), "big": torch.zeros(16 * 2**20)}, wait=True).result()
    snapshot_id = nbguard.load(tmp_path / "ckpt", run=RUN).id
    path = tmp_path / "ckpt" / "runs" / RUN / "snapshots" / f"{snapshot_id}.json"
    manifest = json.loads(path.read_bytes())
    manifest["tensors"]["model/weight"]["storage"] = manifest["tensors"]["big"]["storage"]
    manifest["checksum"] = checksum_of(manifest)
    path.write_text(json.dumps(manifest))
    live = nn.Linear(4, 3)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    read_before = _rchar()
    with pytest.raises(CorruptSnapshotError, match="not the tensor the manifest lays on it"):
        nbguard.load(tmp_path / "ckpt", run=RUN).restore({"model": live}, only=["model"])
    assert _rchar() - read_before < 4 * 2**20, "the entry's bytes were read before its layout was checked"
    assert all(torch.equal(before[k], v) for k, v in live.state_dict().items())


def test_an_entry_larger_than_its_tensors_is_refused_before_reading(tmp_path):
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)
    guard.save({"big": torch.zeros(16 * 2**20, dtype=torch.uint8).view(4, -1)[:, :8]}, wait=True).result()
    snapshot = nbguard.load(tmp_path / "ckpt", run=RUN)
    snapshot.manifest["tensors"]["big"]["shape"] = [1, 8]  # now reaches 8 of the entry's bytes
    read_before = _rchar()
    with pytest.raises(CorruptSnapshotError, match="its tensors cover bytes 0-8"):
        snapshot.restore({}, namespace={})
    assert _rchar() - read_before < 4 * 2**20


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_restoring_into_a_namespace_never_replaces_builtins_modules_or_dunder_names(tmp_path):
    """A shared snapshot holding values called __builtins__, torch and __name__: the notebook keeps
    its own, and the report says what was left alone."""
    store_dir = tmp_path / "store"
    make_snapshots(store_dir)
    snapshot_id, _ = latest_manifest(store_dir)

    def rename(manifest):
        objects = manifest["objects"]
        objects["__builtins__"] = objects.pop("history")
        objects["torch"] = objects.pop("weights")
        objects["__name__"] = dict(objects["__builtins__"])
        objects["np"] = objects.pop("sched")  # an object whose name is a module here

    edit_manifest(store_dir, snapshot_id, rename)
    live = Live()
    namespace = {"__builtins__": __builtins__, "__name__": "__main__", "torch": torch, "np": np,
                 "model": live.model, "opt": live.opt, "gen": live.gen}
    report = nbguard.load(store_dir, "latest", run=RUN).restore(namespace=namespace)
    assert namespace["__builtins__"] is __builtins__ and namespace["torch"] is torch and namespace["np"] is np
    assert namespace["__name__"] == "__main__"
    assert sorted(report.skipped) == ["__builtins__ (a Python internal name)", "__name__ (a Python internal name)",
                                      "np (a module)", "torch (a module)"]
    assert any("left as they are in your session" in note and "torch (a module)" in note for note in report.notes)
    assert "torch (a module)" in report.describe()
    assert {name for name, _ in report.restored} == {"model", "opt", "gen"}
    assert isinstance(namespace["torch"], types.ModuleType)


# -- in place (17.2) -------------------------------------------------------------------------------------
def test_models_and_optimizers_are_restored_into_their_own_memory(tmp_path):
    torch.manual_seed(0)

    def make():
        model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        model[2].weight = nn.Parameter(torch.randn(2, 8))
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        return model, opt

    model, opt = make()
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)
    guard.save({"model": model, "opt": opt}, wait=True).result()
    live_model, live_opt = make()
    live_model(torch.randn(4, 8)).sum().backward()
    live_opt.step()

    def memory(m, o):
        return [t.data_ptr() for t in m.state_dict().values()] + \
            [v.data_ptr() for s in o.state.values() for k, v in s.items() if k != "step"]

    before = memory(live_model, live_opt)
    nbguard.load(tmp_path / "ckpt").restore({"model": live_model, "opt": live_opt})
    assert memory(live_model, live_opt) == before
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), live_model.state_dict().values(),
                                                 strict=True))
    assert repr(opt.state_dict()) == repr(live_opt.state_dict())


def test_a_restore_through_a_guard_exchanges_memory_with_its_staging_buffers(tmp_path):
    """Guard.restore reads into the staging buffers its saves use anyway, then the live storages and
    the buffers exchange memory: nothing is copied into live memory and no memory is added; every
    tensor sharing a live storage (a view the user holds, the optimizer's key) sees the restored bytes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters())
    state = {"model": model, "opt": opt}

    def train():
        opt.zero_grad()
        model(torch.randn(8, 16)).sum().backward()
        opt.step()

    train()
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)
    saved = guard.save(state, wait=True).result()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    train()
    guard.save(state, wait=True).result()  # every staging buffer is warm now
    weight = model[0].weight
    view = weight.view(-1)  # held by the user across the restore

    def live_memory() -> set[int]:
        return {t.data_ptr() for t in model.state_dict().values()} | \
            {t.data_ptr() for s in opt.state.values() for k, t in s.items() if k != "step"}  # (load_state_dict copies step)

    live = live_memory()
    buffers = {b.data_ptr() for b in guard._staging._buffers.values()}

    guard.restore(state, saved.id)

    assert model[0].weight is weight and opt.state[weight]["exp_avg"].shape == weight.shape
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())
    assert torch.equal(view, expected["0.weight"].view(-1))
    moved = live_memory()
    assert moved != live and moved <= buffers  # the live tensors now use former staging memory
    assert {b.data_ptr() for b in guard._staging._buffers.values()} | moved == buffers | live  # nothing new
    guard.save(state, wait=True).result()  # the next save holds the restored bytes, not the buffers' old ones
    assert all(torch.equal(expected[k], v) for k, v in guard.load("latest").state_dict("model").items())
    train()  # the optimizer still knows its parameters


def _warm_guard(tmp_path, state: dict[str, Any], train) -> tuple[Guard, Any]:
    """A guard whose first snapshot is returned, with every staging buffer warm from a second save."""
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)
    first = guard.save(state, wait=True).result()
    train()
    guard.save(state, wait=True).result()
    return guard, first


def _linear_and_adam(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters())

    def train():
        opt.zero_grad()
        model(torch.randn(8, 64)).sum().backward()
        opt.step()

    train()
    return model, opt, train


def test_without_torch_s_memory_exchange_a_guard_restores_into_live_memory(tmp_path, monkeypatch):
    import nbguard.engine.restoring as restoring

    monkeypatch.setattr(restoring, "_CAN_EXCHANGE", False)  # a torch without UntypedStorage._swap_data_ptr_
    model, opt, train = _linear_and_adam()
    state = {"model": model, "opt": opt}
    guard, first = _warm_guard(tmp_path, state, train)
    memory = {k: v.data_ptr() for k, v in model.state_dict().items()}
    guard.restore(state, first.id)
    expected = guard.load(first.id).state_dict("model")
    assert all(torch.equal(expected[k], v) and memory[k] == v.data_ptr() for k, v in model.state_dict().items())


def test_a_corrupt_byte_read_into_staging_memory_changes_nothing_live(tmp_path):
    model, opt, train = _linear_and_adam()
    state = {"model": model, "opt": opt}
    guard, first = _warm_guard(tmp_path, state, train)
    before = {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}
    flip_byte_in_entry(tmp_path / "ckpt", guard.load(first.id).manifest, "model/1.weight", at=17)
    with pytest.raises(CorruptSnapshotError):
        guard.restore(state, first.id)
    assert all(torch.equal(before[k][0], v) and before[k][1] == v.data_ptr() for k, v in model.state_dict().items())
    train()
    saved = guard.save(state, wait=True).result()  # the staging memory the bad bytes landed in still serves
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    train()
    guard.restore(state, saved.id)
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())


def test_restore_latest_through_warm_staging_falls_back_past_a_damaged_newest_snapshot(tmp_path):
    """Guard.restore('latest') checks the bytes as it reads them into staging memory: the damaged
    newest snapshot changes nothing live, and the older one is restored."""
    model, opt, train = _linear_and_adam()
    state = {"model": model, "opt": opt}
    reports: list[str] = []
    guard = Guard(tmp_path / "ckpt", run=RUN, report=reports.append)
    older = guard.save(state, wait=True).result()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    train()
    newest = guard.save(state, wait=True).result()
    flip_byte_in_entry(tmp_path / "ckpt", guard.load(newest.id).manifest, "model/0.weight", at=1000)
    train()
    report = guard.restore(state)
    assert report.snapshot.id == older.id
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())
    assert any(newest.id in note and "damaged" in note for note in report.notes)
    assert any(newest.id in message for message in reports)


def _saved_and_new_process(tmp_path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A model + Adam saved; then the same model built anew with other weights and an optimizer
    without state, as a new process has them before its resume."""
    model, opt, _ = _linear_and_adam()
    Guard(tmp_path / "ckpt", run=RUN, report=None).save({"model": model, "opt": opt}, wait=True).result()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fresh, fresh_opt, _ = _linear_and_adam(seed=1)
    fresh_opt.state.clear()
    return expected, {"model": fresh, "opt": fresh_opt}


def test_a_resume_through_a_guard_whose_staging_is_not_ready_reads_each_storage_once(tmp_path, monkeypatch):
    """A resume starts the guard's prepare and restores at once: storages whose staging buffer is
    not ready yet are read into staging memory claimed for them (one pass, hashed as it lands) and
    exchanged, instead of hashed in the page cache and then copied into live memory (two passes);
    the buffers then hold the displaced memory, and the next save allocates nothing."""
    from nbguard.engine.snapshot import Snapshot

    expected, state = _saved_and_new_process(tmp_path)
    model = state["model"]
    hashed_in_cache: list[str] = []
    check_all = Snapshot.check_all
    monkeypatch.setattr(Snapshot, "check_all", lambda self, keys, *a: (hashed_in_cache.extend(keys),
                                                                       check_all(self, keys, *a))[1])
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)  # no prepare: nothing is ready
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    guard.restore(state)
    assert not hashed_in_cache
    assert all(torch.equal(expected[k], v) and v.data_ptr() != before[k] for k, v in model.state_dict().items())
    guard._staging.wait_prefault()
    buffers = {key: buffer.data_ptr() for key, buffer in guard._staging._buffers.items()}
    assert {buffers[f"model/{k}"] for k in before} == set(before.values())  # the displaced memory, kept
    guard.save(state, wait=True).result()
    assert all(guard._staging._buffers[key].data_ptr() == address for key, address in buffers.items())
    assert all(torch.equal(expected[k], v) for k, v in guard.load("latest").state_dict("model").items())


def test_a_resume_racing_its_prepare_restores_and_keeps_one_buffer_per_group(tmp_path):
    expected, state = _saved_and_new_process(tmp_path)
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)
    guard.prepare(state)  # in the background, as %%checkpointed starts it right before the restore
    guard.restore(state)
    assert all(torch.equal(expected[k], v) for k, v in state["model"].state_dict().items())
    guard._staging.wait_prefault()
    state_bytes = sum(t.numel() * t.element_size() for t in state["model"].state_dict().values()) + sum(
        t.numel() * t.element_size() for s in state["opt"].state.values() for t in s.values() if torch.is_tensor(t))
    rng = sum(b.numel() for k, b in guard._staging._buffers.items() if k.startswith("rng/"))
    assert guard._staging.buffer_bytes - rng == state_bytes
    saved = guard.save(state, wait=True).result()
    assert all(torch.equal(expected[k], v) for k, v in guard.load(saved.id).state_dict("model").items())


def test_a_resume_claims_no_staging_memory_that_does_not_fit(tmp_path, monkeypatch):
    """Where the staging memory does not fit (as when a guard's saves stream), the restore reads into
    live memory as without a guard: it adds no memory."""
    import nbguard.engine.staging as staging

    expected, state = _saved_and_new_process(tmp_path)
    monkeypatch.setattr(staging, "available_memory", lambda: 0)
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)
    before = {k: v.data_ptr() for k, v in state["model"].state_dict().items()}
    guard.restore(state)
    assert all(torch.equal(expected[k], v) and v.data_ptr() == before[k] for k, v in state["model"].state_dict().items())
    assert not guard._staging._buffers


def test_a_corrupt_byte_read_into_claimed_staging_memory_changes_nothing_live(tmp_path):
    _, state = _saved_and_new_process(tmp_path)
    model = state["model"]
    manifest = nbguard.load(tmp_path / "ckpt").manifest
    flip_byte_in_entry(tmp_path / "ckpt", manifest, "model/1.weight", at=17)
    before = {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}
    with pytest.raises(CorruptSnapshotError):
        Guard(tmp_path / "ckpt", run=RUN, report=None).restore_from(nbguard.load(tmp_path / "ckpt"), state)
    assert all(torch.equal(before[k][0], v) and before[k][1] == v.data_ptr() for k, v in model.state_dict().items())
    assert not state["opt"].state


def test_a_prefault_keeps_the_buffer_a_restore_claimed():
    from nbguard.engine.staging import StagingArea

    area = StagingArea()
    claimed = area.claim({"a": 4 << 16})["a"]
    area.prefault({"a": torch.ones(1 << 16), "b": torch.ones(1 << 10)})
    area.wait_prefault()
    assert area._buffers["a"] is claimed and area._buffers["b"].numel() == 4 << 10
    again = area.claim({"a": 4 << 16, "b": 4 << 10})  # ready ones: nothing new
    assert again.keys() == {"a", "b"} and all(again[k] is area._buffers[k] for k in again)


def test_a_snapshot_checked_before_its_restore_is_copied_into_staging_then_exchanged(tmp_path):
    """A %%checkpointed resume checks the snapshot when it picks it (``Catalog.latest_good``) and
    restores it later: its bytes are copied from the page cache into the staging buffers."""
    model, opt, train = _linear_and_adam()
    state = {"model": model, "opt": opt}
    guard, first = _warm_guard(tmp_path, state, train)
    guard.save(state, wait=True).result()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    train()
    snapshot, skipped = guard.catalog.latest_good(RUN)
    assert not skipped and snapshot.was_checked(snapshot.manifest["tensors"]["model/0.weight"]["storage"])
    memory = {k: v.data_ptr() for k, v in model.state_dict().items()}
    guard.restore_from(snapshot, state)
    assert all(torch.equal(expected[k], v) and memory[k] != v.data_ptr() for k, v in model.state_dict().items())


def test_memory_exchanged_is_exchanged_back_when_a_later_object_refuses(tmp_path):
    model, opt, train = _linear_and_adam()
    state = {"model": model, "opt": opt, "other": HalfLoader(1, 50)}
    guard, first = _warm_guard(tmp_path, state, train)
    before = {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}
    with pytest.raises(RestoreError, match="^other refused"):
        guard.restore({**state, "other": HalfLoader(0, 0)}, first.id)
    assert all(torch.equal(before[k][0], v) and before[k][1] == v.data_ptr() for k, v in model.state_dict().items())


def test_a_weight_numpy_shares_is_written_in_place_so_the_array_sees_the_restore(tmp_path):
    """An array from ``.numpy()`` keeps the memory it was made from: that storage is not exchanged."""
    model, opt, train = _linear_and_adam()
    state = {"model": model, "opt": opt}
    guard, first = _warm_guard(tmp_path, state, train)
    expected = guard.load(first.id).state_dict("model")["0.weight"]
    array = model[0].weight.detach().numpy()
    guard.restore(state, first.id)
    assert np.array_equal(array, expected.numpy()) and torch.equal(model[0].weight, expected)


def test_parameters_inside_one_larger_storage_are_written_in_place(tmp_path):
    """Parameters that are views of one flat buffer (as some fused optimizers and FSDP-style code
    lay them out): exchanging one storage's memory would move its neighbours' too."""
    torch.manual_seed(0)
    flat = torch.zeros(64 * 64 + 64)
    model = nn.Linear(64, 64)
    model.weight = nn.Parameter(flat[:64 * 64].view(64, 64))
    model.bias = nn.Parameter(flat[64 * 64:])
    nn.init.normal_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train():
        opt.zero_grad()
        model(torch.randn(8, 64)).sum().backward()
        opt.step()

    state = {"model": model, "opt": opt}
    guard, first = _warm_guard(tmp_path, state, train)
    expected = guard.load(first.id).state_dict("model")
    guard.restore(state, first.id)
    assert torch.equal(model.weight, expected["weight"]) and torch.equal(model.bias, expected["bias"])
    assert model.weight.untyped_storage().data_ptr() == model.bias.untyped_storage().data_ptr()


def test_a_restore_does_not_need_a_second_copy_of_the_state(tmp_path):
    """Peak memory of a restore into a live 200 MiB model + Adam stays far below the state's size
    (the previous restore read into fresh memory, then copied: +1x the state). Measured in a fresh
    process that holds nothing but the live state, as benchmarks.restore_ab does."""
    sys.path.insert(0, str(REPO))
    from benchmarks.run import build_state

    model, opt = build_state(0.1875, seed=0)
    Guard(tmp_path / "ckpt", run="mem", report=None).save({"model": model, "opt": opt}, wait=True).result()
    del model, opt
    script = textwrap.dedent(f"""
        import sys, torch, nbguard
        sys.path.insert(0, {str(REPO)!r})
        from benchmarks.floors import PeakRss, evict_tree
        from benchmarks.run import build_state
        model, opt = build_state(0.1875, seed=1)
        evict_tree({str(tmp_path / 'ckpt')!r})
        with PeakRss() as mem:
            nbguard.load({str(tmp_path / 'ckpt')!r}).restore({{"model": model, "opt": opt}})
        print("PEAK", mem.increase)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    peak = int(out.stdout.split("PEAK")[1])
    assert peak < 80 * 2**20, f"a restore of 200 MiB took {peak / 2**20:.0f} MiB more memory"


def test_the_hash_pass_reads_each_blob_front_to_back_whatever_order_storages_are_named(tmp_path, monkeypatch):
    """A saver writes storages in the order they finish; the restore names them in its own order.
    The hash pass must still read every blob file front to back (out-of-order reads cost a cold
    restore 5-10 %), and hash every storage it was given."""
    from nbguard.engine import snapshot as snapshot_module

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)
    guard.save({"model": model}, wait=True).result()
    snap = guard.load("latest")
    keys = list(snap.manifest["storages"])
    seen: list[tuple[int, int]] = []
    real = snapshot_module.hash_ranges

    def recording(ranges, progress=None):
        seen.extend((id(r.reader), r.offset) for r in ranges)
        return real(ranges, progress)

    monkeypatch.setattr(snapshot_module, "hash_ranges", recording)
    for order in (keys, keys[::-1], keys[1::2] + keys[0::2]):
        seen.clear()
        snap._forget()
        snap.check_all(order)
        assert len(seen) == len(keys)
        by_file: dict[int, list[int]] = {}
        for reader, offset in seen:
            by_file.setdefault(reader, []).append(offset)
        assert all(offsets == sorted(offsets) for offsets in by_file.values())
        assert [reader for reader, _ in seen] == sorted((r for r, _ in seen), key=[r for r, _ in seen].index)
        assert snap._verified == set(keys)


class Strided(nn.Module):
    """A parameter whose memory is not in row-major order (read into fresh memory, then swapped in:
    the path GPU tensors take)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8).t())


def test_tensors_swapped_in_are_swapped_back_when_a_later_object_refuses(tmp_path):
    torch.manual_seed(0)
    saved = Strided()
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)
    guard.save({"model": saved, "other": HalfLoader(1, 50)}, wait=True).result()
    live = Strided()
    before = live.weight.detach().clone()
    with pytest.raises(RestoreError, match="^other refused"):
        guard.restore({"model": live, "other": HalfLoader(0, 0)})
    assert torch.equal(live.weight, before)
    guard.load("latest").restore({"model": live}, only=["model"])
    assert torch.equal(live.weight, saved.weight) and live.weight.stride() == (1, 8)


def test_load_weights_checks_hashes_and_sizes_before_reading(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(512, 512)
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)
    guard.save({"model": model}, wait=True).result()
    out = guard.catalog.export("latest", "model", tmp_path / "model.safetensors", run=RUN)
    assert torch.equal(nbguard.load_weights(out)["weight"], model.weight.detach())
    data = bytearray(Path(out).read_bytes())
    data[-5] ^= 0x10  # a flipped bit in the last tensor's bytes
    Path(out).write_bytes(bytes(data))
    with pytest.raises(CorruptSnapshotError, match="is damaged"):
        nbguard.load_weights(out)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((2**40).to_bytes(8, "little") + b"{}" + bytes(8 * 2**20))
    read_before = _rchar()
    with pytest.raises(CorruptSnapshotError, match="absurd size"):
        nbguard.load_weights(huge)
    assert _rchar() - read_before < 2**20


class CopyingStateDict(nn.Linear):
    """A model whose state_dict() hands out copies, not its own memory."""

    def state_dict(self, *args, **kwargs):
        return {k: v.clone() for k, v in super().state_dict(*args, **kwargs).items()}


def test_a_model_whose_state_dict_hands_out_copies_is_still_restored(tmp_path):
    torch.manual_seed(0)
    saved_plain, saved_copying = nn.Linear(4, 3), CopyingStateDict(4, 3)
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)
    guard.save({"plain": saved_plain, "copying": saved_copying}, wait=True).result()
    plain, copying = nn.Linear(4, 3), CopyingStateDict(4, 3)

    def clone_all(module, state, prefix, local_metadata):
        for key in list(state):
            state[key] = state[key].clone()

    plain.register_state_dict_post_hook(clone_all)
    guard.restore({"plain": plain, "copying": copying})
    assert torch.equal(plain.weight, saved_plain.weight) and torch.equal(plain.bias, saved_plain.bias)
    assert torch.equal(copying.weight, saved_copying.weight) and torch.equal(copying.bias, saved_copying.bias)


def test_weights_tied_in_the_session_but_not_in_the_snapshot_restore_as_torch_would(tmp_path):
    def make(tied: bool) -> nn.Sequential:
        model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
        if tied:
            model[1].weight = model[0].weight
        return model

    torch.manual_seed(0)
    saved = make(tied=False)
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)
    guard.save({"model": saved}, wait=True).result()
    expected, live = make(tied=True), make(tied=True)
    expected.load_state_dict(saved.state_dict())
    guard.restore({"model": live})
    assert torch.equal(live[0].weight, expected[0].weight) and live[1].weight is live[0].weight


class WithExtraState(nn.Linear):
    def __init__(self, tag: str):
        super().__init__(2, 2)
        self.tag = tag

    def get_extra_state(self) -> dict[str, str]:
        return {"tag": self.tag}

    def set_extra_state(self, state: dict[str, str]) -> None:
        self.tag = state["tag"]


def test_a_models_extra_state_is_put_back_too(tmp_path):
    guard = Guard(tmp_path / "ckpt", run=RUN, report=None)
    guard.save({"model": WithExtraState("saved"), "other": HalfLoader(1, 50)}, wait=True).result()
    live = WithExtraState("live")
    with pytest.raises(RestoreError, match="^other refused"):
        guard.restore({"model": live, "other": HalfLoader(0, 0)})
    assert live.tag == "live"
    guard.load("latest").restore({"model": live}, only=["model"])
    assert live.tag == "saved"


def test_nbguard_restore_magic_of_a_shared_snapshot_keeps_builtins_and_modules(shell, tmp_path, capsys):
    """The issue's probe: a snapshot from a shared folder holding __builtins__ and torch."""
    torch.manual_seed(0)
    Guard(tmp_path / "snaps", run="shared", report=None).save(
        {"model": nn.Linear(2, 2), "__builtins__": {"print": 0}, "torch": [1, 2], "save_dir": "/elsewhere"},
        wait=True).result()
    shell.run_cell("import torch\nfrom torch import nn\nmodel = nn.Linear(2, 2)\nsave_dir = 'mine'")
    capsys.readouterr()
    shell.run_line_magic("nbguard", "restore latest")
    out = capsys.readouterr().out
    assert "__builtins__ (a Python internal name)" in out and "torch (a module)" in out
    assert shell.user_ns["torch"] is torch and shell.user_ns["save_dir"] == "/elsewhere"
    result = shell.run_cell("print('still here')")
    assert result.success and "still here" in capsys.readouterr().out
