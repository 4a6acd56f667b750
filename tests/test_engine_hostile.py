"""Restoring into the wrong objects, and damaged or hostile snapshots.

Every failure must be a clear nbguard error, leave the live objects untouched, run no code from
the snapshot, and write nothing outside the store.
"""

from __future__ import annotations

import copy
import json
import pickle
import resource
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import nbguard
from nbguard import (
    Catalog,
    CorruptSnapshotError,
    Guard,
    LocalStore,
    NbguardError,
    RestoreError,
    Snapshot,
    SnapshotError,
)
from nbguard.format.blobfile import blob_path, parse_header
from nbguard.format.manifest import checksum_of, encode_manifest, manifest_path, parse_manifest

pytestmark = pytest.mark.usefixtures("fixed_rng")
RUN = "hostile"


# -- helpers -------------------------------------------------------------------------------------
def files_outside(root: Path, store_dir: Path) -> dict[str, tuple[int, float]]:
    out = {}
    for path in root.rglob("*"):
        if store_dir == path or store_dir in path.parents:
            continue
        if path.is_file() or path.is_symlink():
            st = path.lstat()
            out[str(path)] = (st.st_size, st.st_mtime)
    return out


class Workspace:
    """A store folder next to an 'outside' folder whose files must stay as they were."""

    def __init__(self, root: Path):
        self.root = root
        self.store_dir = root / "store"
        self.outside = root / "outside"
        self.outside.mkdir()
        (self.outside / "precious.txt").write_text("do not touch")
        self.baseline = files_outside(root, self.store_dir)

    def allow(self, path: Path) -> None:
        """A file the test itself put outside the store: from now on it must not change."""
        self.baseline = files_outside(self.root, self.store_dir)

    def __iter__(self):
        return iter((self.store_dir, self.outside))


@pytest.fixture
def workspace(tmp_path):
    """A store folder next to an 'outside' folder; afterwards nothing outside the store changed."""
    space = Workspace(tmp_path)
    yield space
    assert files_outside(tmp_path, space.store_dir) == space.baseline, "something was written outside the store"


def state_dicts_equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        torch.equal(x, b[k]) if isinstance(x, torch.Tensor) else x == b[k] for k, x in a.items())


class Live:
    """Live objects to restore into, and a record of their state to prove they stayed untouched."""

    def __init__(self, seed: int = 100):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.5)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, 3)
        self.gen = torch.Generator().manual_seed(seed)
        self.namespace: dict[str, Any] = {"history": ["live"], "weights": torch.zeros(2)}
        self._record = self._state()

    def objects(self) -> dict[str, Any]:
        return {"model": self.model, "opt": self.opt, "sched": self.sched, "gen": self.gen}

    def _state(self):
        return (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.opt.state_dict()),
                self.sched.state_dict(), self.gen.get_state(), copy.deepcopy(self.namespace))

    def assert_untouched(self) -> None:
        model, opt, sched, gen, namespace = self._record
        assert state_dicts_equal(model, self.model.state_dict()), "the live model changed"
        assert repr(opt) == repr(copy.deepcopy(self.opt.state_dict())), "the live optimizer changed"
        assert sched == self.sched.state_dict(), "the live scheduler changed"
        assert torch.equal(gen, self.gen.get_state()), "the live generator changed"
        assert namespace["history"] == self.namespace["history"]
        assert torch.equal(namespace["weights"], self.namespace["weights"])


def make_snapshots(store_dir: Path, count: int = 1) -> tuple[Guard, list[nbguard.SnapshotInfo]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    gen = torch.Generator().manual_seed(1)
    guard = Guard(store_dir, run=RUN, keep=10, report=None)
    infos = []
    for i in range(count):
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        sched.step()
        torch.rand(3, generator=gen)
        infos.append(guard.save({"model": model, "opt": opt, "sched": sched, "gen": gen,
                                 "history": [i, 0.5], "weights": torch.arange(4.0) + i},
                                position={"epoch": i}, wait=True).result())
    return guard, infos


def manifest_file(store_dir: Path, snapshot_id: str) -> Path:
    return store_dir / manifest_path(RUN, snapshot_id)


def edit_manifest(store_dir: Path, snapshot_id: str, change) -> None:
    path = manifest_file(store_dir, snapshot_id)
    manifest = json.loads(path.read_bytes())
    change(manifest)
    try:  # sealed with a valid checksum, so the check under test is the one that answers
        manifest["checksum"] = checksum_of(manifest)
    except (TypeError, ValueError, RecursionError):
        pass
    path.write_text(json.dumps(manifest))


def storage_of(manifest: dict, tensor_key: str) -> dict:
    return manifest["storages"][manifest["tensors"][tensor_key]["storage"]]


def blob_file(store_dir: Path, manifest: dict, tensor_key: str) -> Path:
    return store_dir / blob_path(storage_of(manifest, tensor_key)["blob"])


def flip_byte_in_entry(store_dir: Path, manifest: dict, tensor_key: str, at: int = 0) -> None:
    spec = storage_of(manifest, tensor_key)
    path = store_dir / blob_path(spec["blob"])
    data = bytearray(path.read_bytes())
    header = parse_header(bytes(data))
    entry = header.entries[spec["entry"]]
    data[header.data_start + entry.begin + at] ^= 0x40
    path.write_bytes(bytes(data))


def restore_into(store_dir: Path, live: Live, ref: str = "latest") -> nbguard.RestoreReport:
    return Guard(store_dir, run=RUN, report=None).restore(live.objects(), ref, namespace=live.namespace)


# -- restoring into the wrong objects --------------------------------------------------------------
def test_missing_objects_are_listed_and_the_rest_restored(workspace):
    store_dir, _ = workspace
    guard, (info,) = make_snapshots(store_dir)
    live = Live()
    report = guard.restore({"model": live.model}, namespace=live.namespace)
    assert sorted(report.missing) == ["gen", "opt", "sched"]
    assert ("model", "Sequential") in report.restored
    assert live.namespace["history"] == [0, 0.5]
    assert "not found in your session" in report.describe() and "opt" in report.describe()
    assert torch.equal(live.model[0].weight, guard.load().state_dict("model")["0.weight"])


WRONG_OBJECTS = {
    "model of another shape": ("model", lambda: nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)),
                               "build the model"),
    "model with other layers": ("model", lambda: nn.Sequential(nn.Linear(4, 3)), "build the model"),
    "optimizer of another type": ("opt", lambda: torch.optim.SGD(nn.Linear(4, 3).parameters(), lr=0.1),
                                  "create the same optimizer"),
    "optimizer over other parameters": ("opt", lambda: torch.optim.Adam(nn.Linear(4, 3, bias=False).parameters()),
                                        "create it over the same"),
    # The same number of parameters, of other shapes: the saved moments would break the next step.
    "optimizer over a model of another shape": ("opt", lambda: torch.optim.Adam(
        nn.Sequential(nn.Linear(5, 2), nn.BatchNorm1d(2)).parameters(), lr=0.1), "create it over the same"),
    "scheduler of another class": ("sched", lambda: torch.optim.lr_scheduler.ExponentialLR(
        torch.optim.Adam(nn.Linear(1, 1).parameters()), 0.9), "create the same kind"),
    "generator replaced by a module": ("gen", lambda: nn.Linear(1, 1), "torch.Generator in the snapshot"),
    "module replaced by a number": ("model", lambda: 3, "without load_state_dict"),
}


@pytest.mark.parametrize("case", list(WRONG_OBJECTS), ids=lambda c: c.replace(" ", "-"))
def test_a_mismatch_raises_before_anything_is_changed(workspace, case):
    store_dir, _ = workspace
    make_snapshots(store_dir)
    name, make_wrong, advice = WRONG_OBJECTS[case]
    live = Live()
    objects = live.objects()
    objects[name] = wrong = make_wrong()
    wrong_state = copy.deepcopy(wrong.state_dict()) if hasattr(wrong, "state_dict") else None
    # The mismatched object is listed last: everything before it must stay untouched too.
    ordered = {k: v for k, v in objects.items() if k != name} | {name: wrong}
    with pytest.raises(RestoreError) as raised:
        Guard(store_dir, run=RUN, report=None).restore(ordered, namespace=live.namespace)
    assert advice in str(raised.value)
    assert name in str(raised.value)
    if wrong_state is not None:
        assert repr(wrong_state) == repr(wrong.state_dict())
    live.assert_untouched()


def test_a_snapshot_taken_on_a_gpu_restores_on_a_cpu_only_machine(workspace):
    store_dir, _ = workspace
    guard, (info,) = make_snapshots(store_dir)
    expected = guard.load()
    saved_model = expected.state_dict("model")

    def to_cuda(manifest):
        for spec in manifest["tensors"].values():
            spec["device"] = "cuda:0"
        pairs = manifest["objects"]["gen"]["tree"]["$dict"]
        for pair in pairs:
            if pair[0] == "device":
                pair[1] = "cuda:0"

    edit_manifest(store_dir, info.id, to_cuda)
    live = Live()
    report = Guard(store_dir, run=RUN, report=None).restore(live.objects(), namespace=live.namespace)
    assert report.missing == []
    for key, value in live.model.state_dict().items():
        assert value.device.type == "cpu"
        assert torch.equal(value, saved_model[key]), key
    assert live.namespace["weights"].device.type == "cpu"
    assert torch.equal(live.namespace["weights"], torch.arange(4.0))
    assert all(t.device.type == "cpu" for s in live.opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def test_a_state_dict_entry_that_is_not_a_tensor_is_refused_before_applying(workspace):
    """A module's tree whose weight is a number passes the key and shape checks; load_state_dict
    would then fail halfway. Restore must refuse it up front."""
    store_dir, _ = workspace
    _, (info,) = make_snapshots(store_dir)

    def weight_to_number(manifest):
        for pair in manifest["objects"]["model"]["tree"]["$dict"]:
            if pair[0] == "0.weight":
                pair[1] = 5

    edit_manifest(store_dir, info.id, weight_to_number)
    live = Live()
    with pytest.raises(NbguardError):
        restore_into(store_dir, live, info.id)
    live.assert_untouched()


def test_a_state_dict_key_that_is_not_text_is_refused_before_applying(workspace):
    store_dir, _ = workspace
    _, (info,) = make_snapshots(store_dir)

    def int_key(manifest):
        manifest["objects"]["model"]["tree"]["$dict"][0][0] = 5

    edit_manifest(store_dir, info.id, int_key)
    live = Live()
    with pytest.raises(NbguardError):
        restore_into(store_dir, live, info.id)
    live.assert_untouched()


@pytest.mark.parametrize("params", [5, "0", None, {"$dict": []}], ids=["int", "str", "null", "dict"])
def test_malformed_optimizer_groups_are_refused_before_applying(workspace, params):
    store_dir, _ = workspace
    _, (info,) = make_snapshots(store_dir)

    def break_groups(manifest):
        pairs = dict(map(tuple, manifest["objects"]["opt"]["tree"]["$dict"]))
        for pair in pairs["param_groups"][0]["$dict"]:
            if pair[0] == "params":
                pair[1] = params

    edit_manifest(store_dir, info.id, break_groups)
    live = Live()
    with pytest.raises(NbguardError):
        restore_into(store_dir, live, info.id)
    live.assert_untouched()


def test_an_optimizer_state_without_its_state_is_refused_before_applying(workspace):
    store_dir, _ = workspace
    _, (info,) = make_snapshots(store_dir)

    def drop_state(manifest):
        tree = manifest["objects"]["opt"]["tree"]
        tree["$dict"] = [pair for pair in tree["$dict"] if pair[0] != "state"]

    edit_manifest(store_dir, info.id, drop_state)
    live = Live()
    with pytest.raises(NbguardError):
        restore_into(store_dir, live, info.id)
    live.assert_untouched()


@pytest.mark.parametrize("bad_state", [5, "abc", [1, 2]], ids=["int", "str", "list"])
def test_a_malformed_generator_state_is_refused_before_applying(workspace, bad_state):
    store_dir, _ = workspace
    _, (info,) = make_snapshots(store_dir)

    def break_generator(manifest):
        for pair in manifest["objects"]["gen"]["tree"]["$dict"]:
            if pair[0] == "state":
                pair[1] = bad_state

    edit_manifest(store_dir, info.id, break_generator)
    live = Live()
    with pytest.raises(NbguardError):
        restore_into(store_dir, live, info.id)
    live.assert_untouched()


def test_a_generator_state_of_the_wrong_size_is_refused_before_applying(workspace):
    store_dir, _ = workspace
    _, (info,) = make_snapshots(store_dir)

    def shrink(manifest):
        key = next(k for k in manifest["tensors"] if k.startswith("gen/"))
        manifest["tensors"][key]["shape"] = [16]

    edit_manifest(store_dir, info.id, shrink)
    live = Live()
    with pytest.raises(NbguardError):
        restore_into(store_dir, live, info.id)
    live.assert_untouched()


@pytest.mark.parametrize("rng", [5, "python", {"$dict": [["python", 5]]}, {"$dict": [["numpy", [1, 2]]]},
                                 {"$dict": [["torch", 5]]}, {"$dict": [["python", {"$tuple": [3, [1, 2], None]}]]}],
                         ids=["int", "str", "python-int", "numpy-short", "torch-int", "python-short"])
def test_a_malformed_rng_record_is_refused_before_applying(workspace, rng):
    store_dir, _ = workspace
    _, (info,) = make_snapshots(store_dir)
    edit_manifest(store_dir, info.id, lambda m: m.__setitem__("rng", rng))
    live = Live()
    with pytest.raises(NbguardError):
        restore_into(store_dir, live, info.id)
    live.assert_untouched()


# -- damaged snapshots ---------------------------------------------------------------------------------
def test_a_truncated_blob_is_a_corrupt_snapshot(workspace):
    store_dir, _ = workspace
    guard, (info,) = make_snapshots(store_dir)
    path = blob_file(store_dir, guard.load().manifest, "model/0.weight")
    path.write_bytes(path.read_bytes()[:-7])
    live = Live()
    with pytest.raises(CorruptSnapshotError):
        restore_into(store_dir, live, info.id)
    live.assert_untouched()
    assert info.id in Catalog(store_dir).verify()


def test_a_flipped_byte_in_tensor_data_is_found(workspace):
    store_dir, _ = workspace
    guard, (info,) = make_snapshots(store_dir)
    flip_byte_in_entry(store_dir, guard.load().manifest, "model/0.weight", at=5)
    live = Live()
    with pytest.raises(CorruptSnapshotError, match="damaged"):
        restore_into(store_dir, live, info.id)
    live.assert_untouched()
    assert "damaged" in Catalog(store_dir).verify()[info.id]


def test_a_flipped_byte_in_a_blob_header_is_found(workspace):
    store_dir, _ = workspace
    guard, (info,) = make_snapshots(store_dir)
    path = blob_file(store_dir, guard.load().manifest, "model/0.weight")
    data = bytearray(path.read_bytes())
    data[20] ^= 0x01
    path.write_bytes(bytes(data))
    live = Live()
    with pytest.raises(CorruptSnapshotError):
        restore_into(store_dir, live, info.id)
    live.assert_untouched()
    assert info.id in Catalog(store_dir).verify()


def test_a_missing_blob_is_reported(workspace):
    store_dir, _ = workspace
    guard, (info,) = make_snapshots(store_dir)
    blob_file(store_dir, guard.load().manifest, "model/0.weight").unlink()
    live = Live()
    with pytest.raises(NbguardError, match="missing"):
        restore_into(store_dir, live, info.id)
    live.assert_untouched()


def test_a_truncated_manifest_is_left_out_and_described(workspace):
    store_dir, _ = workspace
    _, (old, new) = make_snapshots(store_dir, 2)
    path = manifest_file(store_dir, new.id)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptSnapshotError, match="not valid JSON"):
        parse_manifest(path.read_bytes())
    catalog = Catalog(store_dir)
    assert [s.id for s in catalog.snapshots(RUN)] == [old.id]
    assert any(new.id in p for p in catalog.problems)
    with pytest.raises(SnapshotError):
        catalog.get(new.id, RUN)
    assert any(new.id in k for k in catalog.verify(RUN))


def test_an_unknown_format_version_says_upgrade(workspace):
    store_dir, _ = workspace
    guard, (info,) = make_snapshots(store_dir)
    edit_manifest(store_dir, info.id, lambda m: m.__setitem__("version", 99))
    with pytest.raises(SnapshotError, match="upgrade"):
        parse_manifest(manifest_file(store_dir, info.id).read_bytes())
    catalog = Catalog(store_dir)
    assert catalog.snapshots(RUN) == []
    assert "upgrade" in " ".join(catalog.problems.values())


def test_duplicate_keys_are_refused(workspace):
    store_dir, _ = workspace
    guard, (info,) = make_snapshots(store_dir)
    text = manifest_file(store_dir, info.id).read_text()
    doubled = text.replace('"note":null', '"note":null,"note":"second"', 1)
    assert doubled != text
    with pytest.raises(CorruptSnapshotError, match="duplicate"):
        parse_manifest(doubled.encode())

    blob = blob_file(store_dir, guard.load().manifest, "model/0.weight").read_bytes()
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + header_len])
    name = next(k for k in header if k != "__metadata__")
    text = json.dumps(header)
    entry = json.dumps({name: header[name]})[1:-1]
    doubled_header = ("{" + entry + "," + text[1:]).encode()
    with pytest.raises(CorruptSnapshotError, match="duplicate"):
        parse_header(len(doubled_header).to_bytes(8, "little") + doubled_header + blob[8 + header_len:])


@pytest.mark.timeout(30)
def test_deeply_nested_json_is_refused(workspace):
    store_dir, _ = workspace
    guard, (info,) = make_snapshots(store_dir)
    deep = b"[" * 10000 + b"]" * 10000
    with pytest.raises(CorruptSnapshotError, match="nested too deeply|not valid JSON"):
        parse_manifest(deep)
    with pytest.raises(CorruptSnapshotError):
        parse_manifest(b'{"format":"nbguard.snapshot","version":1,"x":' + deep + b"}")
    header = b'{"a":' + b"[" * 10000 + b"]" * 10000 + b"}"
    with pytest.raises(CorruptSnapshotError):
        parse_header(len(header).to_bytes(8, "little") + header)

    # A value nested deeper than nbguard writes, inside an otherwise valid manifest.
    nested: Any = 1
    for _ in range(150):
        nested = [nested]
    edit_manifest(store_dir, info.id, lambda m: m["objects"]["history"].__setitem__("tree", nested))
    live = Live()
    with pytest.raises(CorruptSnapshotError, match="nested too deeply"):
        restore_into(store_dir, live, info.id)
    live.assert_untouched()


@pytest.mark.parametrize("bad", ["../../outside/precious", "/etc/passwd", "..", "a" * 32 + "/../../x",
                                 "ABCDEF0123456789ABCDEF0123456789"])
def test_a_manifest_cannot_name_paths(workspace, bad):
    store_dir, _ = workspace
    guard, (info,) = make_snapshots(store_dir)
    key = guard.load().manifest["tensors"]["model/0.weight"]["storage"]
    edit_manifest(store_dir, info.id, lambda m: m["storages"][key].__setitem__("blob", bad))
    with pytest.raises(CorruptSnapshotError, match="malformed"):
        parse_manifest(manifest_file(store_dir, info.id).read_bytes())
    assert Catalog(store_dir).snapshots(RUN) == []


@pytest.mark.parametrize("run", ["../outside", "/etc", "a/../../b", ""])
def test_a_run_name_cannot_leave_the_store(workspace, run):
    store_dir, _ = workspace
    make_snapshots(store_dir)
    with pytest.raises(NbguardError):
        Guard(store_dir, run=run, report=None)
    if run:
        with pytest.raises(NbguardError):
            Catalog(store_dir).snapshots(run)
        with pytest.raises(NbguardError):
            Catalog(store_dir).find("latest", run)


def test_a_blob_that_is_a_symlink_out_of_the_store_is_refused(workspace):
    store_dir, outside = workspace
    guard, (info,) = make_snapshots(store_dir)
    path = blob_file(store_dir, guard.load().manifest, "model/0.weight")
    copy_outside = outside / "copy-of-blob.safetensors"
    shutil.copy(path, copy_outside)
    workspace.allow(copy_outside)
    path.unlink()
    path.symlink_to(copy_outside)
    live = Live()
    with pytest.raises(NbguardError, match="symbolic link"):
        restore_into(store_dir, live, info.id)
    live.assert_untouched()
    assert info.id in Catalog(store_dir).verify()


def test_a_manifest_that_is_a_symlink_is_not_listed(workspace):
    store_dir, outside = workspace
    _, (info,) = make_snapshots(store_dir)
    path = manifest_file(store_dir, info.id)
    moved = outside / "manifest.json"
    shutil.move(path, moved)
    workspace.allow(moved)
    path.symlink_to(moved)
    assert Catalog(store_dir).snapshots(RUN) == []
    with pytest.raises(NbguardError):
        LocalStore(store_dir).read(manifest_path(RUN, info.id))


def test_absurd_shapes_are_refused_without_allocating(workspace):
    store_dir, _ = workspace
    guard, (info,) = make_snapshots(store_dir)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base = guard.load().manifest
    cases = [([2**40], [1]), ([2**20, 2**20], [2**20, 1]), ([2**49, 2**49], [0, 0]), ([0] + [2**49] * 63, [0] * 64),
             ([2**40], [0]), ([4, 4], [2**45, 1])]
    for shape, stride in cases:
        manifest = copy.deepcopy(base)
        manifest["tensors"]["weights"].update(shape=shape, stride=stride)
        snap = Snapshot(guard.store, parse_manifest(encode_manifest(manifest)))
        try:
            value = snap.restore(only=["weights"], rng=False).values["weights"]
        except NbguardError:
            continue
        # Accepted only as a view of the stored bytes (a broadcast), never as a real allocation.
        assert value.untyped_storage().nbytes() <= 64, f"shape {shape} allocated memory"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024  # KiB


def test_a_blob_header_declaring_absurd_sizes_is_refused():
    def blob(header: dict, data: bytes = b"\0" * 16, length: int | None = None) -> bytes:
        text = json.dumps(header).encode()
        return (len(text) if length is None else length).to_bytes(8, "little") + text + data

    meta = {"format": "pt", "nbguard.hashes": json.dumps({"a": "0" * 32})}
    with pytest.raises(CorruptSnapshotError):
        parse_header(blob({"a": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}, "__metadata__": meta}))
    with pytest.raises(CorruptSnapshotError):
        parse_header(blob({"a": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 16]}, "__metadata__": meta}))
    with pytest.raises(CorruptSnapshotError, match="absurd"):
        parse_header(blob({"a": {}}, length=2**62))
    with pytest.raises(CorruptSnapshotError):
        parse_header(blob({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, "__metadata__": meta}))
    with pytest.raises(CorruptSnapshotError):
        parse_header(blob({"a": {"dtype": "OBJ", "shape": [4], "data_offsets": [0, 16]}, "__metadata__": meta}))
    with pytest.raises(CorruptSnapshotError):
        parse_header(blob({"a": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}, "__metadata__": meta}))


@pytest.mark.parametrize("dtype,shape,match", [
    ("float64", [4], "reaches past"),           # 32 bytes asked of a 16-byte storage
    ("float32", [5], "reaches past"),
    ("no_such_dtype", [4], "dtype"),
    ("Tensor", [4], "dtype"),
    ("__class__", [4], "dtype"),
])
def test_dtype_and_shape_mismatches_are_refused(workspace, dtype, shape, match):
    store_dir, _ = workspace
    _, (info,) = make_snapshots(store_dir)
    edit_manifest(store_dir, info.id,
                  lambda m: m["tensors"]["weights"].update(dtype=dtype, shape=shape, stride=[1]))
    live = Live()
    with pytest.raises(CorruptSnapshotError, match=match):
        restore_into(store_dir, live, info.id)
    live.assert_untouched()


# -- wrong types in every field ------------------------------------------------------------------------
BAD_TOP = {
    "format": [None, 1, "other.format"],
    "version": [None, "1", 1.5, True, [], 0, -1],
    "id": [None, 5, "../../outside", "x"],
    "run": [None, 5, "../x", "/abs", ""],
    "created": [None, "today", [], True, 10**400, 1e400],
    "writer": [None, 5, []],
    "metrics": [None, [], {"loss": "low"}, {"loss": None}, {"loss": True}, {"loss": [1]}],
    "note": [5, [], {}],
    "tags": [None, "tag", [1], {}],
    "size": [None, -1, 2**60, "1", 1.5, True],
    "written": [None, -1, "1", 1.5],
    "versions": [None, [], "1"],
    "storages": [None, [], "x"],
    "tensors": [None, [], "x"],
    "objects": [None, [], "x", {"m": 5}, {"m": {"kind": "value"}}],
    "skipped": [None, [], "x"],
}
BAD_STORAGE = {
    "blob": [None, 5, "../../outside", "/etc/passwd", "0" * 31, "Z" * 32, ["0" * 32]],
    "entry": [None, 5, []],
    "nbytes": [None, -1, "4", 2**50, 1.5],
    "hash": [None, 5, "x", []],
}
BAD_TENSOR = {
    "storage": [None, 5, [], {}, "no-such-storage"],
    "shape": [None, "4", [-1], [1.5], [2**50], [[1]], [1] * 65, {}],
    "stride": [None, "1", [-1], [0.5], [2**50], [[1]], {}],
    "byte_offset": [None, -1, "0", 1.5, [], 2**70],
    "dtype": [None, 5, [], "not_a_dtype", "Tensor"],
    "device": [None, 5, []],
    "requires_grad": [None, "yes", 1, []],
}
BAD_OBJECT = {
    "kind": [None, "pickle", 5, []],
    "type": [None, 5, []],
}
DROPPABLE = ["format", "version", "id", "run", "created", "writer", "metrics", "note", "tags", "size", "written",
             "versions", "storages", "tensors", "objects", "skipped", "rng", "position", "extra"]


def _cases():
    for key, values in BAD_TOP.items():
        for v in values:
            yield f"{key}={v!r:.20}", ("top", key, v)
    for key, values in BAD_STORAGE.items():
        for v in values:
            yield f"storages.{key}={v!r:.20}", ("storage", key, v)
    for key, values in BAD_TENSOR.items():
        for v in values:
            yield f"tensors.{key}={v!r:.20}", ("tensor", key, v)
    for key, values in BAD_OBJECT.items():
        for v in values:
            yield f"objects.{key}={v!r:.20}", ("object", key, v)
    for key in DROPPABLE:
        yield f"drop {key}", ("drop", key, None)
    for key in ("blob", "entry", "nbytes", "hash"):
        yield f"drop storages.{key}", ("drop-storage", key, None)
    for key in ("storage", "shape", "stride", "byte_offset", "dtype", "device", "requires_grad"):
        yield f"drop tensors.{key}", ("drop-tensor", key, None)
    for key in ("kind", "type", "tree"):
        yield f"drop objects.{key}", ("drop-object", key, None)


CASES = dict(_cases())
MAY_BE_ACCEPTED = {"drop note"}  # an optional field: accepting its absence is as right as refusing it


def _apply_case(manifest: dict, case: tuple) -> None:
    where, key, value = case
    tensor = manifest["tensors"]["model/0.weight"]
    storage = manifest["storages"][tensor["storage"]]
    obj = manifest["objects"]["model"]
    if where == "top":
        manifest[key] = value
    elif where == "storage":
        storage[key] = value
    elif where == "tensor":
        tensor[key] = value
    elif where == "object":
        obj[key] = value
    elif where == "drop":
        del manifest[key]
    elif where == "drop-storage":
        del storage[key]
    elif where == "drop-tensor":
        del tensor[key]
    elif where == "drop-object":
        del obj[key]


@pytest.fixture(scope="module")
def pristine_store(tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("pristine") / "store"
    _, (info,) = make_snapshots(store_dir)
    return store_dir, info.id


@pytest.mark.parametrize("case", list(CASES))
def test_a_wrong_type_in_any_field_is_a_clear_error(workspace, pristine_store, case):
    store_dir, _ = workspace
    shutil.copytree(pristine_store[0], store_dir)
    snapshot_id = pristine_store[1]
    edit_manifest(store_dir, snapshot_id, lambda m: _apply_case(m, CASES[case]))
    live = Live()
    catalog = Catalog(store_dir)
    try:
        listed = [s.id for s in catalog.snapshots(RUN)]
        if snapshot_id not in listed:
            assert catalog.problems, "a snapshot vanished from the list without a described problem"
            with pytest.raises(SnapshotError):
                catalog.get(snapshot_id, RUN)
            return
        snapshot = catalog.get(snapshot_id, RUN)
        snapshot.verify()
        snapshot.restore(live.objects(), namespace=live.namespace)
    except NbguardError:
        live.assert_untouched()
        return
    if case not in MAY_BE_ACCEPTED:
        pytest.fail(f"a manifest with {case} was accepted and restored")


def test_position_that_cannot_be_decoded_does_not_hide_the_other_snapshots(workspace):
    store_dir, _ = workspace
    _, (old, new) = make_snapshots(store_dir, 2)
    edit_manifest(store_dir, new.id, lambda m: m.__setitem__("position", {"$no_such_tag": 1}))
    catalog = Catalog(store_dir)
    assert [s.id for s in catalog.snapshots(RUN)] == [old.id]
    assert any(new.id in p for p in catalog.problems)
    live = Live()
    report = Guard(store_dir, run=RUN, report=None).restore(live.objects())
    assert report.snapshot.id == old.id


def test_an_absurd_metric_value_does_not_break_best(workspace):
    store_dir, _ = workspace
    _, (old, new) = make_snapshots(store_dir, 2)
    edit_manifest(store_dir, old.id, lambda m: m.__setitem__("metrics", {"loss": 1.0}))
    edit_manifest(store_dir, new.id, lambda m: m.__setitem__("metrics", {"loss": 10**400}))
    catalog = Catalog(store_dir)
    try:
        best = catalog.find("best:loss", RUN)
    except NbguardError:
        return
    assert best.id == old.id


# -- nothing runs ---------------------------------------------------------------------------------
class Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_a_pickle_in_place_of_a_blob_or_manifest_runs_nothing(workspace):
    store_dir, outside = workspace
    guard, (old, new) = make_snapshots(store_dir, 2)
    marker = store_dir / "marker-created-by-unpickling"
    evil = pickle.dumps(Payload(marker), protocol=4)
    evil2 = pickle.dumps(Payload(marker), protocol=2)

    blob_file(store_dir, guard.load().manifest, "model/0.weight").write_bytes(evil)
    live = Live()
    with pytest.raises(CorruptSnapshotError):
        restore_into(store_dir, live, new.id)
    live.assert_untouched()
    assert new.id in Catalog(store_dir).verify()

    manifest_file(store_dir, old.id).write_bytes(evil2)
    catalog = Catalog(store_dir)
    assert [s.id for s in catalog.snapshots(RUN)] == [new.id]
    assert any(old.id in p for p in catalog.problems)
    with pytest.raises(SnapshotError, match="no intact snapshot"):
        Guard(store_dir, run=RUN, report=None).restore(live.objects())

    weights = store_dir / "weights.safetensors"
    for payload in (evil, evil2):
        weights.write_bytes(payload)
        with pytest.raises(CorruptSnapshotError):
            nbguard.load_weights(weights)
    torch.save({"x": Payload(marker)}, weights)  # a torch .pt file (a zip around a pickle)
    with pytest.raises(CorruptSnapshotError):
        nbguard.load_weights(weights)
    assert not marker.exists(), "a pickle was executed"


@pytest.mark.parametrize("content", [b"", b"\x01\x02", b"\x10\0\0\0\0\0\0\0{not json}      ",
                                     b"\x02\0\0\0\0\0\0\0[]", b"\x04\0\0\0\0\0\0\0\"x\"  "],
                         ids=["empty", "short", "bad-json", "json-list", "json-string"])
def test_load_weights_on_a_broken_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(CorruptSnapshotError):
        nbguard.load_weights(path)


# -- 'latest' falls back to the newest intact snapshot -----------------------------------------------
def test_restore_latest_skips_a_snapshot_with_damaged_tensors_and_says_so(workspace, reports):
    store_dir, _ = workspace
    guard, (old, new) = make_snapshots(store_dir, 2)
    flip_byte_in_entry(store_dir, guard.load().manifest, "model/0.weight")
    live = Live()
    report = Guard(store_dir, run=RUN, report=reports.append).restore(live.objects(), namespace=live.namespace)
    assert report.snapshot.id == old.id
    assert live.namespace["history"] == [0, 0.5]
    assert any(new.id in note and "damaged" in note for note in report.notes)
    assert any(new.id in message for message in reports)
    assert new.id in report.describe()


def test_restore_latest_skips_a_snapshot_with_a_damaged_rng_record(workspace, reports):
    store_dir, _ = workspace
    guard, (old, new) = make_snapshots(store_dir, 2)
    flip_byte_in_entry(store_dir, guard.load().manifest, "rng/torch", at=100)
    live = Live()
    report = Guard(store_dir, run=RUN, report=reports.append).restore(live.objects(), namespace=live.namespace)
    assert report.snapshot.id == old.id
    assert any(new.id in message for message in reports)


def test_restore_latest_skips_a_snapshot_whose_manifest_is_damaged_and_says_so(workspace, reports):
    store_dir, _ = workspace
    _, (old, new) = make_snapshots(store_dir, 2)
    path = manifest_file(store_dir, new.id)
    path.write_bytes(path.read_bytes()[:-30])
    live = Live()
    report = Guard(store_dir, run=RUN, report=reports.append).restore(live.objects(), namespace=live.namespace)
    assert report.snapshot.id == old.id
    assert any(new.id in note for note in report.notes), f"no word about the damaged newest snapshot: {report.notes}"
    assert any(new.id in message for message in reports)


def test_restore_latest_with_every_snapshot_damaged_is_a_clear_error(workspace):
    store_dir, _ = workspace
    guard, infos = make_snapshots(store_dir, 2)
    for info in infos:
        flip_byte_in_entry(store_dir, guard.catalog.get(info.id, RUN).manifest, "weights")
    live = Live()
    with pytest.raises(SnapshotError, match="no intact snapshot"):
        restore_into(store_dir, live)
    live.assert_untouched()


def test_restoring_a_damaged_snapshot_by_id_does_not_fall_back(workspace):
    store_dir, _ = workspace
    guard, (old, new) = make_snapshots(store_dir, 2)
    flip_byte_in_entry(store_dir, guard.load().manifest, "weights")
    live = Live()
    with pytest.raises(CorruptSnapshotError):
        restore_into(store_dir, live, new.id)
    live.assert_untouched()
