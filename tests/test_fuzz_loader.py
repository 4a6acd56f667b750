"""Fuzzing the loader: whatever bytes a manifest or a blob holds, reading and restoring it raises
nothing but nbguard's own errors, and never hangs.

Inputs are random bytes, and valid manifests and blobs from a real save, mutated (keys dropped,
types changed, huge numbers, deep nesting, unknown tags, truncation). Each test prints how many
inputs it ran.
"""

from __future__ import annotations

import copy
import json
import struct
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from nbguard import Catalog, Guard, MemoryStore, NbguardError, Snapshot
from nbguard.format.blobfile import BufferReader, blob_path, parse_header, read_entry
from nbguard.format.manifest import checksum_of, encode_manifest, manifest_path, parse_manifest

pytestmark = [pytest.mark.usefixtures("fixed_rng"), pytest.mark.timeout(120)]

EXAMPLES = 300
# Derandomized so that a run is reproducible; no shrinking, so that a failure costs no more time
# than a pass (the failing input is printed draw by draw).
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, print_blob=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
TAGS = ["$tuple", "$dict", "$set", "$frozenset", "$float", "$complex", "$bytes", "$tensor", "$ndarray",
        "$npscalar", "$dtype", "$device", "$size", "$nope"]
ODD_NUMBERS = [10**400, -(10**400), 2**64, 2**63, 2**63 - 1, -(2**63), 2**50, 2**49, -1, 0, 1e308, -0.0, 0.5, 5e-324]


def build_material() -> tuple[MemoryStore, dict[str, Any], bytes]:
    """One real snapshot of a little of everything: its store, its manifest, one of its blobs."""
    torch.manual_seed(0)
    store = MemoryStore("fuzz")
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    base = torch.arange(12, dtype=torch.float32)
    values = {
        "view_a": base, "view_b": base[4:].view(2, 4).T,
        "history": [1, 2.5, float("nan"), "x", None, True, (1, 2), {"k": [1]}, {3: "int key", (1, "t"): "tuple key"}],
        "array": np.arange(6, dtype=np.int16).reshape(2, 3)[:, ::2], "npscalar": np.float32(1.5),
        "blob": b"\x00\x01", "c": complex(1, -1), "s": {1, 2}, "dtype": torch.float16, "size": torch.Size([2, 3]),
        "device": torch.device("cpu"), "half": torch.ones(3, dtype=torch.bfloat16),
    }
    guard = Guard(store, run="fuzz", report=None)
    guard.save({"model": model, "opt": opt, "gen": torch.Generator().manual_seed(3), **values},
               position={"epoch": 1, "batch": 2}, metrics={"loss": 0.5}, note="n", tags=["t"], wait=True).result()
    manifest = guard.load().manifest
    blob = next(iter({s["blob"] for s in manifest["storages"].values()}))
    return store, copy.deepcopy(manifest), store.read(blob_path(blob))


STORE, MANIFEST, BLOB = build_material()
BLOB_HEADER_LEN = struct.unpack("<Q", BLOB[:8])[0]
BLOB_HEADER = json.loads(BLOB[8:8 + BLOB_HEADER_LEN])


def live_objects() -> dict[str, Any]:
    return {"model": nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)),
            "opt": torch.optim.Adam(nn.Linear(3, 2).parameters()), "gen": torch.Generator()}


# -- strategies --------------------------------------------------------------------------------------
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(ODD_NUMBERS),
                         st.floats(allow_nan=False), st.text(max_size=12), st.sampled_from(TAGS))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(TAGS)), inner, max_size=3)),
    max_leaves=12)


def all_paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    out = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.append(prefix + (k,))
            out += all_paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.append(prefix + (i,))
            out += all_paths(v, prefix + (i,))
    return out


def at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def nested(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


def mutate_once(data: st.DataObject, tree: Any) -> Any:
    paths = all_paths(tree)
    if not paths:
        return data.draw(json_values)
    path = data.draw(st.sampled_from(paths))
    parent, key = at(tree, path[:-1]), path[-1]
    old = parent[key]
    op = data.draw(st.sampled_from(["delete", "replace", "odd", "wrap_list", "wrap_tag", "nest", "stringify",
                                    "graft", "retag", "empty"]))
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = data.draw(json_values)
    elif op == "odd":
        parent[key] = data.draw(st.sampled_from(ODD_NUMBERS))
    elif op == "wrap_list":
        parent[key] = [old]
    elif op == "wrap_tag":
        parent[key] = {data.draw(st.sampled_from(TAGS)): old}
    elif op == "nest":
        parent[key] = nested(old, data.draw(st.integers(1, 400)))
    elif op == "stringify":
        parent[key] = json.dumps(old)
    elif op == "graft":
        parent[key] = copy.deepcopy(at(tree, data.draw(st.sampled_from(paths))))
    elif op == "retag" and isinstance(old, dict) and len(old) == 1:
        parent[key] = {data.draw(st.sampled_from(TAGS)): next(iter(old.values()))}
    elif op == "empty":
        parent[key] = type(old)() if isinstance(old, (dict, list, str)) else None
    return tree


def mutated(data: st.DataObject, original: Any) -> Any:
    tree = copy.deepcopy(original)
    for _ in range(data.draw(st.integers(1, 4))):
        tree = mutate_once(data, tree)
    return tree


def byte_damage(data: st.DataObject, raw: bytes) -> bytes:
    op = data.draw(st.sampled_from(["none", "none", "truncate", "flip", "insert", "append"]))
    if op == "none" or not raw:
        return raw
    at_ = data.draw(st.integers(0, len(raw) - 1))
    if op == "truncate":
        return raw[:at_]
    if op == "flip":
        return raw[:at_] + bytes([raw[at_] ^ data.draw(st.integers(1, 255))]) + raw[at_ + 1:]
    if op == "insert":
        return raw[:at_] + data.draw(st.binary(min_size=1, max_size=8)) + raw[at_:]
    return raw + data.draw(st.binary(min_size=1, max_size=64))


class Counter:
    def __init__(self):
        self.n = 0


def report_count(capsys, what: str, counter: Counter) -> None:
    with capsys.disabled():
        print(f"\n[fuzz] {what}: {counter.n} inputs")


def only_nbguard_errors(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except NbguardError:
        pass


def load_everything(raw: bytes) -> None:
    """Everything a user can do with a manifest's bytes: parse, list, verify, read, restore."""
    manifest = parse_manifest(raw)
    snapshot = Snapshot(STORE, manifest)
    only_nbguard_errors(snapshot.verify)
    for key in list(manifest["tensors"])[:50]:
        only_nbguard_errors(snapshot.tensor, key)
    namespace: dict[str, Any] = {}
    only_nbguard_errors(snapshot.restore, live_objects(), namespace=namespace)


# -- manifests ----------------------------------------------------------------------------------------
def test_random_bytes_as_a_manifest(capsys):
    counter = Counter()

    @FUZZ
    @given(st.one_of(st.binary(max_size=2000), json_values.map(lambda v: json.dumps(v).encode())))
    def run(raw: bytes) -> None:
        counter.n += 1
        only_nbguard_errors(load_everything, raw)

    try:
        run()
    finally:
        report_count(capsys, "manifest from random bytes", counter)


def sealed(tree: object) -> bytes:
    """A mutated manifest with a matching checksum where one can be computed, so the fuzzing reaches
    the field checks behind the checksum."""
    if isinstance(tree, dict):
        try:
            tree = {**tree, "checksum": checksum_of(tree)}
        except (TypeError, ValueError, RecursionError):
            pass
    return json.dumps(tree, allow_nan=True).encode()


def test_mutated_manifests(capsys):
    counter = Counter()
    assert parse_manifest(encode_manifest(MANIFEST)) == MANIFEST  # the seed itself is valid

    @FUZZ
    @given(st.data())
    def run(data: st.DataObject) -> None:
        counter.n += 1
        tree = mutated(data, MANIFEST)
        raw = byte_damage(data, sealed(tree))
        only_nbguard_errors(load_everything, raw)

    try:
        run()
    finally:
        report_count(capsys, "mutated manifests", counter)


def test_mutated_manifests_in_a_catalog(capsys):
    """The same, through the catalog: listing, finding, picking the newest intact snapshot."""
    counter = Counter()

    @FUZZ
    @given(st.data())
    def run(data: st.DataObject) -> None:
        counter.n += 1
        store = MemoryStore("fuzz-catalog")
        for path in {blob_path(s["blob"]) for s in MANIFEST["storages"].values()}:
            store.write(path, [STORE.read(path)])
        tree = mutated(data, MANIFEST)
        store.write(manifest_path(MANIFEST["run"], MANIFEST["id"]), [sealed(tree)])
        catalog = Catalog(store)
        only_nbguard_errors(catalog.snapshots)
        only_nbguard_errors(catalog.find, "best:loss", MANIFEST["run"])
        only_nbguard_errors(catalog.latest_good, MANIFEST["run"])
        only_nbguard_errors(catalog.verify)
        only_nbguard_errors(Guard(store, run=MANIFEST["run"], report=None).restore, live_objects())

    try:
        run()
    finally:
        report_count(capsys, "mutated manifests through a catalog", counter)


# -- blobs ----------------------------------------------------------------------------------------------
def read_blob(raw: bytes, expected_name: str | None = None) -> None:
    header = parse_header(raw, expected_name=expected_name)
    for name in header.entries:
        only_nbguard_errors(read_entry, BufferReader(raw), header, name)


def test_random_bytes_as_a_blob(capsys):
    counter = Counter()

    @FUZZ
    @given(st.one_of(
        st.binary(max_size=3000),
        st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=500)).map(lambda t: struct.pack("<Q", t[0]) + t[1]),
        json_values.map(lambda v: json.dumps(v).encode()).map(lambda h: struct.pack("<Q", len(h)) + h),
    ))
    def run(raw: bytes) -> None:
        counter.n += 1
        only_nbguard_errors(read_blob, raw)

    try:
        run()
    finally:
        report_count(capsys, "blob from random bytes", counter)


def test_mutated_blobs(capsys):
    counter = Counter()
    data_section = BLOB[8 + BLOB_HEADER_LEN:]
    read_blob(BLOB)  # the seed itself is valid

    @FUZZ
    @given(st.data())
    def run(data: st.DataObject) -> None:
        counter.n += 1
        header = mutated(data, BLOB_HEADER)
        if data.draw(st.booleans()) and isinstance(header.get("__metadata__") if isinstance(header, dict) else None, dict):
            hashes = header["__metadata__"].get("nbguard.hashes")
            if isinstance(hashes, str):
                try:
                    header["__metadata__"]["nbguard.hashes"] = json.dumps(mutated(data, json.loads(hashes)))
                except ValueError:
                    pass
        text = json.dumps(header, allow_nan=True).encode()
        length = len(text) if data.draw(st.integers(0, 9)) else data.draw(st.integers(0, 2**64 - 1))
        raw = byte_damage(data, struct.pack("<Q", length) + text + data_section)
        only_nbguard_errors(read_blob, raw)
        only_nbguard_errors(read_blob, raw, expected_name="0" * 32)

    try:
        run()
    finally:
        report_count(capsys, "mutated blobs", counter)


def test_damaged_blob_bytes_under_a_valid_manifest(capsys):
    """Byte damage to a real blob, read through a snapshot: found, never misread, never a crash."""
    counter = Counter()
    blob_name = next(s["blob"] for s in MANIFEST["storages"].values())
    keys = [k for k, s in MANIFEST["storages"].items() if s["blob"] == blob_name]

    @FUZZ
    @given(st.data())
    def run(data: st.DataObject) -> None:
        counter.n += 1
        raw = byte_damage(data, BLOB)
        store = MemoryStore("fuzz-blob")
        for path in {blob_path(s["blob"]) for s in MANIFEST["storages"].values()}:
            store.write(path, [STORE.read(path)])
        store.corrupt(blob_path(blob_name), raw)
        snapshot = Snapshot(store, MANIFEST)
        for key in keys:
            try:
                value = snapshot.storage(key)
            except NbguardError:
                continue
            assert raw == BLOB or bytes(value.numpy()) == bytes(Snapshot(STORE, MANIFEST).storage(key).numpy()), \
                "damaged bytes were read as if they were intact"

    try:
        run()
    finally:
        report_count(capsys, "damaged blob bytes under a valid manifest", counter)


def test_the_fuzz_material_is_random_enough():
    """A guard against a fuzzer that silently tests nothing: mutations do change the manifest."""
    changed = 0

    @settings(max_examples=30, deadline=None, database=None, derandomize=True)
    @given(st.data())
    def run(data: st.DataObject) -> None:
        nonlocal changed
        if mutated(data, MANIFEST) != MANIFEST:
            changed += 1

    run()
    assert changed >= 20
