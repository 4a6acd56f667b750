"""Save and restore give back exactly what was saved, bit for bit, and training continues exactly.

Every test goes through a real store (a folder in tmp_path unless it says otherwise) and the
public API: Guard.save / Guard.restore, nbguard.load, Catalog.export.
"""

from __future__ import annotations

import copy
import math
import random
import struct
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import (
    ExponentialLR,
    LinearLR,
    OneCycleLR,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)

import nbguard
from nbguard import Guard, MemoryStore

pytestmark = pytest.mark.usefixtures("fixed_rng")


# -- bitwise comparison --------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy()) if flat.numel() else b""


def assert_tensor_same(a: torch.Tensor, b: torch.Tensor, path: str, *, strides: bool = True) -> None:
    assert isinstance(b, torch.Tensor), f"{path}: expected a tensor, got {type(b).__name__}"
    assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.device == b.device, f"{path}: device {a.device} != {b.device}"
    if strides and a.numel() > 1:
        assert a.stride() == b.stride(), f"{path}: stride {a.stride()} != {b.stride()}"
    assert tensor_bytes(a) == tensor_bytes(b), f"{path}: tensor bytes differ"


def assert_same(a: Any, b: Any, path: str = "value", *, strides: bool = True) -> None:
    """Deep, bitwise equality: types, dtypes, shapes, nan payloads and -0.0 included."""
    if isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: {type(b).__name__} is not a dict"
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k!r}", strides=strides)
        return
    assert type(a) is type(b), f"{path}: type {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert_tensor_same(a, b, path, strides=strides)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"{path}: array bytes differ"
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, complex):
        assert_same(a.real, b.real, path)
        assert_same(a.imag, b.imag, path)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}/{i}", strides=strides)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# -- a small but complete training setup --------------------------------------------------------
def build(seed: int) -> dict[str, Any]:
    """Models, optimizers of several kinds, one scheduler of each kind, a GradScaler, a Generator."""
    torch.manual_seed(seed)
    m1 = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    opt1 = torch.optim.Adam(m1.parameters(), lr=1e-2)
    m2 = nn.Linear(6, 3)
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    m3 = nn.Linear(5, 1, bias=False)
    opt3 = torch.optim.SGD(m3.parameters(), lr=0.1, momentum=0.5)
    m4 = nn.Linear(5, 1, bias=False)
    opt4 = torch.optim.Adam(m4.parameters(), lr=0.1)
    return {
        "m1": m1, "opt1": opt1, "sched1": StepLR(opt1, step_size=2, gamma=0.5),
        "m2": m2, "opt2": opt2, "sched2": ReduceLROnPlateau(opt2, patience=0, factor=0.5),
        "m3": m3, "opt3": opt3,
        "sched3": SequentialLR(opt3, [LinearLR(opt3, start_factor=0.5, total_iters=2), ExponentialLR(opt3, 0.9)],
                               milestones=[2]),
        "m4": m4, "opt4": opt4, "sched4": OneCycleLR(opt4, max_lr=0.5, total_steps=50),
        "scaler": torch.amp.GradScaler("cpu"),
        "gen": torch.Generator().manual_seed(seed + 1),
    }


def train_step(o: dict[str, Any], history: list) -> None:
    x = torch.randn(16, 6)
    y = torch.randn(16, 3) + 0.01 * torch.randn(16, 3, generator=o["gen"])
    loss1 = F.mse_loss(o["m1"](x), y)
    o["scaler"].scale(loss1).backward()
    o["scaler"].step(o["opt1"])
    o["scaler"].update()
    o["opt1"].zero_grad()
    o["sched1"].step()
    loss2 = F.mse_loss(o["m2"](x), y)
    loss2.backward()
    o["opt2"].step()
    o["opt2"].zero_grad()
    o["sched2"].step(loss2.item() * (1 + len(history) % 2))  # plateaus now and then: lr changes
    for m, opt, sched in (("m3", "opt3", "sched3"), ("m4", "opt4", "sched4")):
        o[m](torch.randn(4, 5)).pow(2).mean().backward()
        o[opt].step()
        o[opt].zero_grad()
        o[sched].step()
    history.append((loss1.item(), random.random(), float(np.random.rand())))


def full_state(o: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of every object's state, plus the global generators' states."""
    out: dict[str, Any] = {}
    for name, obj in o.items():
        out[name] = obj.get_state() if isinstance(obj, torch.Generator) else copy.deepcopy(obj.state_dict())
    out["rng"] = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    return out


def draws() -> tuple:
    return torch.rand(4), random.random(), np.random.rand(3)


def test_training_state_restores_bitwise_and_continues_identically(tmp_path, reports):
    guard = Guard(tmp_path / "ckpt", run="train", report=reports.append)
    live = build(seed=0)
    history: list = []
    for _ in range(4):
        train_step(live, history)
    before = full_state(live)
    guard.save({**live, "history": history}, position={"epoch": 0, "batch": 4}, wait=True)
    assert guard.last_error is None and reports == []

    # The reference: the same objects simply keep training.
    reference_history = list(history)
    for _ in range(5):
        train_step(live, reference_history)
    reference = full_state(live)
    reference_draws = draws()

    # A fresh session: objects built differently, then restored.
    fresh = build(seed=99)
    torch.manual_seed(5)  # the global generators are elsewhere too
    random.seed(5)
    np.random.seed(5)
    report = guard.restore(fresh)
    assert set(report.values) == {"history"}
    assert report.missing == []
    assert {name for name, _ in report.restored} == set(fresh) | {"history"}
    assert set(report.rng) >= {"python", "numpy", "torch"}
    assert report.position == {"epoch": 0, "batch": 4}
    assert_same(before, full_state(fresh), "restored")

    restored_history = report.values["history"]
    assert_same(history, restored_history, "history")
    for _ in range(5):
        train_step(fresh, restored_history)
    assert_same(reference, full_state(fresh), "after 5 more steps")
    assert_same(reference_history, restored_history, "history after 5 more steps")
    assert_same(reference_draws, draws(), "next random draws")


def test_generator_alone_restores_its_stream(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.rand(10, generator=gen)
    guard = Guard(tmp_path / "ckpt", run="g", report=None)
    guard.save({"gen": gen}, wait=True)
    expected = torch.rand(100, generator=gen)
    other = torch.Generator().manual_seed(12345)
    guard.restore({"gen": other}, rng=False)
    assert_tensor_same(expected, torch.rand(100, generator=other), "stream")


def plain_values() -> dict[str, Any]:
    return {
        "int": -17,
        "huge_int": 2**200 + 1,
        "negative_huge": -(3**150),
        "float": 0.1,
        "neg_zero": -0.0,
        "nan": math.nan,
        "inf": math.inf,
        "ninf": -math.inf,
        "true": True,
        "false": False,
        "text": "héllo\nwörld \u2603 \U0001F600",
        "surrogate_escaped": b"caf\xe9".decode("utf-8", "surrogateescape"),
        "empty_text": "",
        "none": None,
        "bytes": bytes(range(256)),
        "complex": complex(1.5, -2.25),
        "complex_nan": complex(math.nan, math.inf),
        "nested": [1, (2, [3, {"a": (4, 5)}]), [], ()],
        "int_keys": {1: "one", 2: "two", -3: [1.5]},
        "tuple_keys": {(1, 2): "a", ("x", (3,)): "b", None: 0, 2.5: "float key", True: "bool key"},
        "set": {1, 2, "three", (4, 5)},
        "frozenset": frozenset({0.5, "x"}),
        "empty_dict": {},
        "empty_set": set(),
        "ordered": OrderedDict([("b", 1), ("a", 2)]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "size": torch.Size([2, 3]),
    }


def test_plain_values_restore_bitwise(tmp_path):
    values = plain_values()
    guard = Guard(tmp_path / "ckpt", run="values", report=None)
    guard.save(values, wait=True)
    namespace: dict[str, Any] = {}
    report = guard.restore(namespace=namespace)
    assert set(namespace) == set(values)
    for name, value in values.items():
        assert_same(value, namespace[name], name)
        assert report.values[name] is namespace[name]


def test_plain_values_are_restored_into_a_namespace_or_returned(tmp_path):
    guard = Guard(tmp_path / "ckpt", run="ns", report=None)
    guard.save({"epoch": 7, "losses": [0.5, 0.25]}, wait=True)
    report = guard.restore()
    assert report.values == {"epoch": 7, "losses": [0.5, 0.25]}
    namespace = {"epoch": 0, "unrelated": "kept"}
    guard.restore(namespace=namespace)
    assert namespace == {"epoch": 7, "losses": [0.5, 0.25], "unrelated": "kept"}


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if dtype.is_floating_point:
        base = torch.randn(shape) * 3
        if base.numel() >= 2:
            base.view(-1)[0] = math.nan
            base.view(-1)[1] = -0.0
        return base.to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000) + 1, shape, dtype=torch.int64).to(dtype) \
        if dtype != torch.int64 else torch.randint(info.min, info.max, shape, dtype=torch.int64)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_tensors_of_every_dtype_and_layout_restore_bitwise(tmp_path, dtype):
    t = sample(dtype, (4, 6))
    separate = sample(dtype, (3, 5, 2))
    values = {
        "contiguous": separate,
        "transposed": t.T,
        "strided": t[::2, 1::3],
        "expanded": t[0:1].expand(5, 6),
        "zero_size": torch.empty(0, 3, dtype=dtype),
        "zero_size_view": t[:, 6:],
        "scalar": t[1, 2],  # a 0-d view into t's storage
        "standalone_scalar": sample(dtype, ()),
        "channels_last": sample(dtype, (2, 3, 4, 5)).contiguous(memory_format=torch.channels_last),
    }
    guard = Guard(tmp_path / "ckpt", run="dtypes", report=None)
    guard.save(values, wait=True)
    restored = guard.restore().values
    for name, value in values.items():
        assert_tensor_same(value, restored[name], name)
        assert restored[name].requires_grad is False


def test_requires_grad_tensor_as_plain_value(tmp_path):
    p = torch.randn(3, requires_grad=True)
    guard = Guard(tmp_path / "ckpt", run="grad", report=None)
    guard.save({"p": p}, wait=True)
    assert_tensor_same(p, guard.restore().values["p"], "p")


def test_numpy_arrays_and_scalars_restore_bitwise(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 8)).astype(np.float32)
    values = {
        "contiguous": rng.integers(-5, 5, (3, 4), dtype=np.int16),
        "non_contiguous": base[:, ::3],
        "negative_stride": base[::-1, ::-2],
        "fortran": np.asfortranarray(rng.standard_normal((3, 5))),
        "zero_d": np.array(3.5, dtype=np.float16),
        "empty": np.zeros((0, 4), dtype=np.uint8),
        "bools": rng.random(7) > 0.5,
        "complex": (rng.standard_normal(4) + 1j * rng.standard_normal(4)).astype(np.complex64),
        "f32": np.float32(0.1),
        "f64": np.float64(math.nan),
        "f16": np.float16(-0.0),
        "i64": np.int64(-(2**62)),
        "u64": np.uint64(2**64 - 1),
        "u8": np.uint8(255),
        "bool_": np.bool_(True),
        "c64": np.complex64(1 - 2j),
    }
    guard = Guard(tmp_path / "ckpt", run="numpy", report=None)
    guard.save(values, wait=True)
    restored = guard.restore().values
    for name, value in values.items():
        assert_same(value, restored[name], name)


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(tokens))


def test_tied_weights_are_stored_once_and_restore_tied(tmp_path):
    model = TiedLM()
    guard = Guard(tmp_path / "ckpt", run="tied", report=None)
    info = guard.save({"model": model}, wait=True).result()
    weight_bytes = model.emb.weight.numel() * 4
    snap = guard.load()
    model_keys = [k for k in snap.manifest["tensors"] if k.startswith("model/")]
    assert sorted(model_keys) == ["model/emb.weight", "model/out.weight"]
    assert len({snap.manifest["tensors"][k]["storage"] for k in model_keys}) == 1
    rng_bytes = sum(snap.manifest["storages"][snap.manifest["tensors"][k]["storage"]]["nbytes"]
                    for k in snap.manifest["tensors"] if k.startswith("rng/"))
    assert info.size == weight_bytes + rng_bytes
    assert info.size <= info.written <= info.size + 4096  # the blob header (one 4 KiB block) is the only extra

    fresh = TiedLM()
    guard.restore({"model": fresh})
    assert fresh.out.weight is fresh.emb.weight
    assert_tensor_same(model.emb.weight.detach(), fresh.emb.weight.detach(), "emb.weight")
    tokens = torch.randint(0, 50, (4, 7))
    assert torch.equal(model(tokens), fresh(tokens))


def test_a_view_of_another_saved_tensor_is_a_view_again(tmp_path):
    a = torch.arange(10, dtype=torch.float32)
    b = a[2:]
    c = a.view(2, 5).T
    guard = Guard(tmp_path / "ckpt", run="views", report=None)
    info = guard.save({"a": a, "b": b, "c": c}, wait=True).result()
    assert info.size - _rng_bytes(guard) == a.numel() * 4  # one storage, stored once

    values = guard.restore().values
    a2, b2, c2 = values["a"], values["b"], values["c"]
    assert_tensor_same(a, a2, "a")
    assert_tensor_same(b, b2, "b")
    assert_tensor_same(c, c2, "c")
    assert b2.data_ptr() == a2.data_ptr() + 2 * a2.element_size()
    assert c2.data_ptr() == a2.data_ptr()
    a2[3] = 100.0
    assert b2[1].item() == 100.0 and c2[3, 0].item() == 100.0


def _rng_bytes(guard: Guard) -> int:
    m = guard.load().manifest
    return sum(m["storages"][m["tensors"][k]["storage"]]["nbytes"] for k in m["tensors"] if k.startswith("rng/"))


def test_restored_tensors_are_writable_and_do_not_change_the_snapshot(tmp_path):
    guard = Guard(tmp_path / "ckpt", run="cow", report=None)
    guard.save({"t": torch.ones(1000)}, wait=True)
    first = guard.restore().values["t"]
    first.mul_(5)
    assert torch.equal(guard.restore().values["t"], torch.ones(1000))
    assert guard.catalog.verify() == {}


def test_load_from_a_script_elsewhere(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model(torch.randn(8, 4))  # BatchNorm running stats move
    guard = Guard(tmp_path / "ckpt", run="script", report=None)
    guard.save({"model": model, "epoch": 3}, metrics={"loss": 0.5}, wait=True)

    snap = nbguard.load(tmp_path / "ckpt")
    assert snap.names == ("model", "epoch")
    assert snap.metrics == {"loss": 0.5}
    assert snap.value("epoch") == 3
    assert_same(dict(model.state_dict()), snap.state_dict("model"), "state_dict")
    fresh = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    snap.restore({"model": fresh}, rng=False)
    assert_same(model.state_dict(), fresh.state_dict(), "model")
    assert nbguard.load(tmp_path / "ckpt", "best:loss", run="script").id == snap.id


def test_export_writes_standard_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    guard = Guard(tmp_path / "ckpt", run="export", report=None)
    guard.save({"model": model}, wait=True)
    out = guard.catalog.export("latest", "model", tmp_path / "weights" / "model.safetensors", run="export")
    loaded = safetensors_torch.load_file(out)
    assert_same(dict(model.state_dict()), {k: loaded[k] for k in model.state_dict()}, "safetensors")
    weights = nbguard.load_weights(out)
    assert set(weights) == set(model.state_dict())
    assert_same(dict(model.state_dict()), {k: weights[k] for k in model.state_dict()}, "load_weights")
    with pytest.raises(nbguard.UsageError, match="has no 'nope'"):
        guard.catalog.export("latest", "nope", tmp_path / "x.safetensors", run="export")


def test_export_of_strided_tensors_writes_their_bytes(tmp_path):
    """Tensors stored strided (a transposed weight) are copied contiguous for the file; each copy must
    live until it is written (a byte view does not keep its tensor alive)."""
    torch.manual_seed(0)
    model = nn.Module()
    for k in range(6):
        model.register_parameter(f"w{k}", nn.Parameter(torch.randn(64, 256).t()))
    guard = Guard(tmp_path / "ckpt", run="export", report=None)
    guard.save({"model": model}, wait=True)
    out = guard.catalog.export("latest", "model", tmp_path / "model.safetensors", run="export")
    weights = nbguard.load_weights(out)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_load_weights_reads_safetensors_written_by_others(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.ones(2, dtype=torch.bfloat16)}
    safetensors_torch.save_file(tensors, tmp_path / "other.safetensors")
    loaded = nbguard.load_weights(tmp_path / "other.safetensors")
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        assert_tensor_same(value, loaded[name], name)


@pytest.mark.parametrize("name", ["__metadata__", "a/b", "x#2", "", "ünï", "rng", " "])
def test_any_variable_name_can_be_saved(tmp_path, name):
    guard = Guard(tmp_path / "ckpt", run="names", report=None)
    value = {"torch": torch.ones(3)} if name == "rng" else torch.ones(3)
    guard.save({name: value, "other": torch.zeros(2)}, wait=True)
    assert guard.catalog.verify() == {}
    values = guard.restore().values
    assert_same(value, values[name], name)
    assert_same(torch.zeros(2), values["other"], "other")


@pytest.mark.parametrize("store_kind", ["local", "memory"])
def test_one_snapshot_restored_twice_gives_the_saved_state_both_times(tmp_path, store_kind):
    """Trials from one checkpoint: restore, train, restore the same Snapshot again. Training after the
    first restore must not leak into the second (nor into the snapshot's own view of its tensors)."""
    store = MemoryStore() if store_kind == "memory" else nbguard.LocalStore(tmp_path / "ckpt")
    model = nn.Linear(4, 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    guard = Guard(store, run="trials", report=None)
    guard.save({"model": model, "opt": opt, "t": torch.ones(3)}, wait=True)
    saved_opt = copy.deepcopy(opt.state_dict())
    snap = guard.load()
    for trial in range(3):
        m = nn.Linear(4, 4)
        o = torch.optim.Adam(m.parameters(), lr=0.1)
        report = snap.restore({"model": m, "opt": o}, rng=False)
        assert_same(saved_opt, o.state_dict(), f"trial {trial}: optimizer")
        assert_same(torch.ones(3), report.values["t"], f"trial {trial}: value")
        for _ in range(2):
            m(torch.randn(3, 4)).sum().backward()
            o.step()
            o.zero_grad()
        report.values["t"].add_(1)
    assert_same(saved_opt["state"], snap.state_dict("opt")["state"], "the snapshot's own view")


def test_restoring_a_name_the_snapshot_lacks_is_an_nbguard_error(tmp_path):
    guard = Guard(tmp_path / "ckpt", run="names", report=None)
    guard.save({"a": 1}, wait=True)
    with pytest.raises(nbguard.NbguardError, match="nope"):
        guard.load().restore({}, only=["nope"])


def test_partial_restore(tmp_path):
    guard = Guard(tmp_path / "ckpt", run="partial", report=None)
    model, other = nn.Linear(2, 2), nn.Linear(2, 2)
    guard.save({"model": model, "other": other, "n": 5}, wait=True)
    fresh, fresh_other = nn.Linear(2, 2), nn.Linear(2, 2)
    untouched = copy.deepcopy(fresh_other.state_dict())
    report = guard.load().restore({"model": fresh, "other": fresh_other}, only=["model"], rng=False)
    assert [name for name, _ in report.restored] == ["model"] and report.rng == []
    assert torch.equal(fresh.weight, model.weight)
    assert_same(untouched, fresh_other.state_dict(), "other")


@pytest.mark.parametrize("store_kind", ["memory", "fsspec"])
def test_round_trip_through_other_stores(store_kind):
    store = MemoryStore("rt") if store_kind == "memory" else nbguard.FsspecStore(f"memory://nbguard-rt/{random.random()}")
    model = nn.Linear(5, 5)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 5)).sum().backward()
    opt.step()
    guard = Guard(store, run="r", report=None)
    guard.save({"model": model, "opt": opt}, wait=True)
    fresh = nn.Linear(5, 5)
    fresh_opt = torch.optim.Adam(fresh.parameters())
    guard.restore({"model": fresh, "opt": fresh_opt})
    assert_same(model.state_dict(), fresh.state_dict(), "model")
    assert_same(opt.state_dict(), fresh_opt.state_dict(), "opt")


# -- values nbguard cannot store ------------------------------------------------------------------
class Custom:
    pass


def test_unstorable_values_are_skipped_with_one_line_each_and_nothing_is_pickled(tmp_path, reports):
    model = nn.Linear(3, 3)
    with open(tmp_path / "some.txt", "w") as handle:
        state = {
            "model": model,
            "log_file": handle,
            "fn": lambda x: x,
            "obj": Custom(),
            "mixed": {"ok": 1, "bad": Custom()},
            "history": [1, 2, 3],
        }
        guard = Guard(tmp_path / "ckpt", run="skip", report=reports.append)
        h = guard.save(state, wait=True)
    assert h.exception() is None
    info = h.result()
    assert set(info.objects) == {"model", "history"}
    assert len(reports) == 4
    for name in ("log_file", "fn", "obj", "mixed"):
        (line,) = [r for r in reports if f"not saving {name}" in r]
        assert "\n" not in line
    assert "TextIOWrapper" in next(r for r in reports if "log_file" in r)
    assert "Custom" in next(r for r in reports if "'mixed'" in r or " mixed" in r)
    assert set(guard.load().manifest["skipped"]) == {"log_file", "fn", "obj", "mixed"}

    # The same skips are not repeated on every save.
    guard.save({"model": model, "fn": state["fn"]}, wait=True)
    assert len(reports) == 4

    fresh = nn.Linear(3, 3)
    report = guard.restore({"model": fresh}, ref=info.id)
    assert report.values == {"history": [1, 2, 3]}
    assert torch.equal(fresh.weight, model.weight)

    files = [p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()]
    assert files
    for path in files:
        head = path.read_bytes()[:2]
        assert head not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"), f"{path} starts like a pickle"
        assert b"PK\x03\x04" != path.read_bytes()[:4], f"{path} is a zip (torch.save) file"


def test_a_failing_state_dict_skips_only_that_object(tmp_path, reports):
    class Broken:
        def state_dict(self):
            raise RuntimeError("boom")

        def load_state_dict(self, state):
            pass

    guard = Guard(tmp_path / "ckpt", run="broken", report=reports.append)
    info = guard.save({"broken": Broken(), "n": 1}, wait=True).result()
    assert info.objects == ("n",)
    assert len(reports) == 1 and "broken" in reports[0] and "boom" in reports[0]


def test_an_int_too_long_for_json_does_not_lose_the_snapshot(tmp_path, reports):
    """Python refuses to print ints of more than 4300 digits: such a value must be stored or skipped,
    never make the whole save fail."""
    guard = Guard(tmp_path / "ckpt", run="bigint", report=reports.append)
    handle = guard.save({"big": 10**5000, "n": 1}, wait=True)
    assert handle.exception() is None, f"the save failed: {handle.exception()!r}"
    values = guard.restore().values
    assert values["n"] == 1
    assert values.get("big", 10**5000) == 10**5000


def test_a_numpy_longdouble_does_not_lose_the_snapshot(tmp_path, reports):
    """np.longdouble(...).item() is not a Python float: it must be stored or skipped with a message,
    never make the whole save fail in the background."""
    guard = Guard(tmp_path / "ckpt", run="longdouble", report=reports.append)
    handle = guard.save({"x": np.longdouble(1.5), "n": 1}, wait=True)
    assert handle.exception() is None, f"the save failed: {handle.exception()!r}"
    values = guard.restore().values
    assert values["n"] == 1
    if "x" in values:
        assert values["x"] == np.longdouble(1.5)
    else:
        assert any("not saving x" in r for r in reports)


@pytest.mark.parametrize("values", [
    [0.25 * i for i in range(20)],  # a loss history: stored in one pass
    [0.5] * 9 + [math.nan, math.inf],  # not all finite: item by item
    [1e308] * 10,  # finite, though their sum is not
    list(range(-5, 20)) + [2**70],  # one int too large for 64 bits
    [1] * 9 + [True, 2.5],  # bools and floats mixed in
    tuple(range(625)),  # Python's RNG state is such a tuple
])
def test_long_lists_of_numbers_round_trip_exactly(values):
    guard = Guard(MemoryStore(), run="numbers", report=None)
    guard.save({"values": values}, wait=True)
    restored = guard.restore({}).values["values"]
    assert type(restored) is type(values)
    assert len(restored) == len(values)
    for a, b in zip(restored, values, strict=True):
        assert type(a) is type(b) and (a == b or (a != a and b != b))
