"""The contract every store keeps (see nbguard/store.py), run against each store in
conftest.STORE_FACTORIES: atomic writes, listings without unfinished files, safe paths, private
writable blob buffers, and a full Guard round trip."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import nbguard
from nbguard import Guard, LocalStore, MemoryStore, Store, StoreError, UsageError, open_store
from nbguard.stores import FsspecStore, check_relative

UNSAFE = ["../escape", "/etc/passwd", "a/../../b", "a/./b", "a//b", "a\\b", "", "a/", "..", ".", "a/\0b"]


def paths(infos) -> list[str]:
    return sorted(f.path for f in infos)


def test_is_a_store(any_store):
    assert isinstance(any_store, Store)
    assert isinstance(any_store.url, str) and any_store.url


def test_write_read_exists(any_store):
    assert not any_store.exists("a/b/file.bin")
    any_store.write("a/b/file.bin", [b"hello ", bytearray(b"wor"), memoryview(b"ld")])
    assert any_store.exists("a/b/file.bin")
    assert any_store.read("a/b/file.bin") == b"hello world"
    assert not any_store.exists("a/b")  # a folder is not a file
    assert not any_store.exists("a/b/other.bin")


def test_write_reports_progress_in_bytes(any_store):
    seen: list[int] = []
    data = bytes(range(256)) * 1000
    any_store.write("p/file.bin", [data[:1000], data[1000:]], progress=seen.append)
    assert sum(seen) == len(data)


def test_write_replaces_an_existing_file(any_store):
    any_store.write("f.bin", [b"first version, long"])
    any_store.write("f.bin", [b"second"])
    assert any_store.read("f.bin") == b"second"
    assert paths(any_store.list("")) == ["f.bin"]


def test_empty_file(any_store):
    any_store.write("empty.bin", [])
    assert any_store.exists("empty.bin")
    assert any_store.read("empty.bin") == b""
    assert [f.size for f in any_store.list("")] == [0]


def test_list_and_folders(any_store):
    assert any_store.list("") == [] and any_store.folders("") == []
    assert any_store.list("missing/folder") == [] and any_store.folders("missing") == []
    any_store.write("top.txt", [b"1"])
    any_store.write("blobs/ab/x.bin", [b"22"])
    any_store.write("blobs/cd/y.bin", [b"333"])
    any_store.write("blobs/z.bin", [b"4444"])
    assert paths(any_store.list("")) == ["top.txt"]
    assert paths(any_store.list("blobs")) == ["blobs/z.bin"]
    assert paths(any_store.list("blobs/ab")) == ["blobs/ab/x.bin"]
    assert any_store.folders("") == ["blobs"]
    assert any_store.folders("blobs") == ["ab", "cd"]
    now = time.time()
    for info in any_store.list("blobs/cd"):
        assert info.size == 3
        assert abs(info.mtime - now) < 120, "mtime must be the unix time of the write"


def test_delete(any_store):
    any_store.write("d/x.bin", [b"x"])
    any_store.delete("d/x.bin")
    assert not any_store.exists("d/x.bin")
    assert any_store.list("d") == []
    any_store.delete("d/x.bin")  # deleting a missing file is fine
    any_store.delete("never/was.bin")
    with pytest.raises(StoreError):
        any_store.read("d/x.bin")


def test_reading_a_missing_file_is_a_store_error(any_store):
    with pytest.raises(StoreError, match="missing"):
        any_store.read("no/such.bin")
    with pytest.raises(StoreError):
        any_store.open_blob("no/such.bin")


def test_an_unfinished_write_is_never_listed_or_readable(any_store):
    any_store.write("w/done.bin", [b"done"])
    seen_during = {}

    def chunks():
        yield b"first half "
        seen_during["list"] = paths(any_store.list("w"))
        seen_during["exists"] = any_store.exists("w/new.bin")
        seen_during["folders"] = any_store.folders("w")
        yield b"second half"

    any_store.write("w/new.bin", chunks())
    assert seen_during == {"list": ["w/done.bin"], "exists": False, "folders": []}
    assert paths(any_store.list("w")) == ["w/done.bin", "w/new.bin"]


def test_a_write_that_fails_midway_leaves_nothing_visible(any_store):
    any_store.write("f/keep.bin", [b"old content"])

    def failing():
        yield b"partial"
        raise OSError(28, "No space left on device")

    with pytest.raises((StoreError, OSError)):
        any_store.write("f/keep.bin", failing())
    with pytest.raises((StoreError, OSError)):
        any_store.write("f/new.bin", failing())
    assert any_store.read("f/keep.bin") == b"old content"
    assert paths(any_store.list("f")) == ["f/keep.bin"]
    assert not any_store.exists("f/new.bin")


def test_open_blob_gives_a_private_writable_buffer(any_store):
    data = bytes(range(256)) * 64
    any_store.write("blobs/aa/blob.bin", [data])
    buffer = any_store.open_blob("blobs/aa/blob.bin")
    view = memoryview(buffer)
    assert not view.readonly
    assert bytes(view) == data
    view[0:4] = b"XXXX"  # tensors built on the buffer may be written ...
    assert any_store.read("blobs/aa/blob.bin") == data  # ... without changing the file
    assert bytes(memoryview(any_store.open_blob("blobs/aa/blob.bin"))) == data


@pytest.mark.parametrize("path", UNSAFE)
def test_check_relative_rejects_unsafe_paths(path):
    with pytest.raises(StoreError, match="unsafe"):
        check_relative(path)


@pytest.mark.parametrize("path", ["a", "a/b.c", "runs/x/snapshots/20260101T000000-000-abcd.json", ".tmp-x", "a..b"])
def test_check_relative_accepts_plain_paths(path):
    assert check_relative(path) == path


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../b", "a\\b"])
def test_every_operation_refuses_unsafe_paths(any_store, path):
    with pytest.raises(StoreError):
        any_store.write(path, [b"x"])
    with pytest.raises(StoreError):
        any_store.read(path)
    with pytest.raises(StoreError):
        any_store.open_blob(path)
    with pytest.raises(StoreError):
        any_store.delete(path)
    with pytest.raises(StoreError):
        any_store.exists(path)


def test_unsafe_paths_write_nothing_outside(tmp_path):
    store = LocalStore(tmp_path / "store")
    with pytest.raises(StoreError):
        store.write("../outside.bin", [b"x"])
    assert not (tmp_path / "outside.bin").exists()


def test_a_guard_round_trip_on_every_store(any_store):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    guard = Guard(any_store, run="contract", keep=2, report=None)
    for epoch in range(3):
        info = guard.save({"model": model, "opt": opt, "epoch": epoch}, position={"epoch": epoch},
                          metrics={"loss": 1.0 / (epoch + 1)}, wait=True).result()
    assert [s.position["epoch"] for s in guard.snapshots()] == [2, 1]
    assert guard.catalog.verify() == {}
    fresh = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
    fresh_opt = torch.optim.Adam(fresh.parameters())
    state = torch.get_rng_state()
    report = guard.restore({"model": fresh, "opt": fresh_opt})
    torch.set_rng_state(state)
    assert report.snapshot.id == info.id and report.values == {"epoch": 2}
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key])
    assert repr(opt.state_dict()) == repr(fresh_opt.state_dict())
    # Only finished files: no temporary names anywhere in the listings.
    for folder in ["", "blobs", *(f"blobs/{p}" for p in any_store.folders("blobs")), "runs/contract/snapshots"]:
        assert not any(f.path.rsplit("/", 1)[-1].startswith(".tmp-") for f in any_store.list(folder))


# -- opening stores by location ----------------------------------------------------------------------
def test_open_store_by_location(tmp_path):
    assert isinstance(open_store(tmp_path / "a"), LocalStore)
    assert isinstance(open_store(str(tmp_path / "b")), LocalStore)
    assert open_store(f"file://{tmp_path}/c").root == str(tmp_path / "c")
    memory = open_store("memory://contract-named")
    assert isinstance(memory, MemoryStore) and open_store("memory://contract-named") is memory
    assert open_store("memory://contract-other") is not memory
    assert open_store(memory) is memory
    with pytest.raises(UsageError, match="empty"):
        open_store("")
    with pytest.raises(UsageError, match="unknown store URL scheme"):
        open_store("nosuchscheme://x")


def test_a_file_is_not_a_store_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        LocalStore(tmp_path / "file")


def test_memory_stores_are_instance_scoped():
    a, b = MemoryStore("same"), MemoryStore("same")
    a.write("x", [b"1"])
    assert not b.exists("x")


def test_fsspec_store_url():
    store = FsspecStore("memory://nbguard-contract-url/root")
    assert store.url == "memory://nbguard-contract-url/root"
    assert isinstance(nbguard.Catalog("memory://nbguard-contract-url-2").store, MemoryStore)
