"""DriveStore through the real pydrive2/googleapiclient stack against the Drive v2 emulator."""

from __future__ import annotations

import hashlib
import mmap
import os

import pytest

from nbguard.errors import StoreError
from nbguard.stores import FileInfo, Store
from nbguard.stores.drive import DriveStore, RetryPolicy
from tests.drive_emulator import DriveEmulator

MIB = 1 << 20
FAST = RetryPolicy(attempts=5, base_delay=0.001, max_delay=0.005)


@pytest.fixture(autouse=True)
def _no_ambient_drive_settings(monkeypatch):
    monkeypatch.delenv("NBGUARD_DRIVE_CREDENTIALS", raising=False)
    monkeypatch.delenv("NBGUARD_DRIVE_API_ROOT", raising=False)


@pytest.fixture
def emulator():
    with DriveEmulator() as emu:
        yield emu
        assert not emu.errors, emu.errors[0]


def make_store(emulator, tmp_path, url="gdrive://nbguard/test", **options) -> DriveStore:
    options = {"chunk_size": MIB, "retry": FAST, "cache_dir": tmp_path / "cache", **options}
    return DriveStore(url, credentials=emulator.authorized_user_info(), api_root=emulator.url, **options)


@pytest.fixture
def store(emulator, tmp_path) -> DriveStore:
    return make_store(emulator, tmp_path)


def payload(size: int, seed: int = 0) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]


def pieces(data: bytes, n: int):
    for i in range(0, len(data), n):
        yield data[i:i + n]


def upload_puts(emulator):
    return [r for r in emulator.requests if r.method == "PUT" and r.path.startswith("/upload/")]


# -- the Store contract ------------------------------------------------------------------------------------
def test_is_a_store(store):
    assert isinstance(store, Store) and repr(store) == "DriveStore('gdrive://nbguard/test')"


def test_empty_store(store, emulator):
    assert store.list("") == [] and store.folders("") == [] and store.list("runs/x") == []
    assert not store.exists("runs/a.json")
    with pytest.raises(StoreError, match="missing"):
        store.read("runs/a.json")
    assert emulator.files() == []  # reading creates no folders


def test_write_read_list_folders(store, emulator):
    store.write("runs/train/snapshots/20261125T101500-ab12.json", [b'{"a": ', b"1}"])
    store.write("blobs/ab/ab12.safetensors", [b"\x00" * 10])
    store.write("top.txt", [b"top"])
    assert store.read("runs/train/snapshots/20261125T101500-ab12.json") == b'{"a": 1}'
    assert [(f.path, f.size) for f in store.list("runs/train/snapshots")] == [
        ("runs/train/snapshots/20261125T101500-ab12.json", 8)]
    assert [(f.path, f.size) for f in store.list("")] == [("top.txt", 3)]
    assert all(isinstance(f, FileInfo) and f.mtime > 1.7e9 for f in store.list(""))
    assert store.folders("") == ["blobs", "runs"] and store.folders("blobs") == ["ab"]
    assert store.exists("blobs/ab/ab12.safetensors") and not store.exists("blobs/ab/other")
    titles = {f["title"] for f in emulator.files()}
    assert {"nbguard", "test", "runs", "train", "snapshots", "blobs", "ab"} <= titles


def test_unsafe_paths_are_refused(store):
    for bad in ("/abs", "../up", "a//b", "a\\b", ""):
        with pytest.raises(StoreError, match="unsafe"):
            store.write(bad, [b"x"])


def test_replace_keeps_one_file(store, emulator):
    store.write("m.json", [b"one"])
    store.write("m.json", [b"two"])
    assert store.read("m.json") == b"two"
    assert [f["title"] for f in emulator.files()].count("m.json") == 1
    assert store.list("") == [store.list("")[0]] and store.list("")[0].size == 3


def test_readers_pick_the_newest_duplicate_and_write_removes_older_ones(store, emulator):
    store.write("d.json", [b"first"])
    folder = next(f["id"] for f in emulator.files() if f["title"] == "test")
    emulator.add_file("d.json", b"second", parent=folder)  # someone else's upload, same title
    assert store.read("d.json") == b"second" and len(store.list("")) == 1
    store.write("d.json", [b"third"])
    assert [f["title"] for f in emulator.files()].count("d.json") == 1
    store.delete("d.json")
    assert not store.exists("d.json")


def test_delete_is_permanent_and_frees_quota(store, emulator):
    store.write("blob.bin", [payload(3 * MIB)])
    used, total = store.quota()
    assert used == 3 * MIB and total == emulator.quota_bytes
    store.delete("blob.bin")
    store.delete("blob.bin")  # missing is fine
    store.delete("no/such/folder/file")
    assert not store.exists("blob.bin")
    assert [f for f in emulator.files() if f["title"] == "blob.bin"] == []  # not in the trash either
    assert store.quota()[0] == 0 and emulator.quota_used(in_trash=True) == 0
    assert not any(r.path.endswith("/trash") for r in emulator.requests)


def test_open_blob_maps_a_verified_download(store, emulator, tmp_path):
    data = payload(5 * MIB + 17)
    store.write("blobs/b.bin", [data])
    seen = []
    blob = store.open_blob("blobs/b.bin", progress=seen.append)
    assert isinstance(blob, mmap.mmap) and blob[:] == data and sum(seen) == len(data)
    ranges = [r.range for r in emulator.requests if r.query.get("alt") == "media"]
    assert ranges[:2] == ["bytes=0-1048575", "bytes=1048576-2097151"] and len(ranges) == 6
    blob[0] = data[0] ^ 0xFF  # a private copy-on-write map: writable, the cached file is untouched
    assert store.open_blob("blobs/b.bin")[:] == data
    blob.close()
    assert os.listdir(tmp_path / "cache") == []  # unlinked once mapped
    store.write("empty", [])
    assert store.open_blob("empty") == b"" and store.read("empty") == b""


def test_md5_size_verify(store):
    data = payload(1234)
    store.write("x.bin", [data])
    digest = hashlib.md5(data).hexdigest()
    assert store.md5("x.bin") == digest and store.size("x.bin") == 1234
    assert store.verify("x.bin", digest.upper()) and not store.verify("x.bin", "0" * 32)
    assert not store.verify("nope.bin", digest)
    with pytest.raises(StoreError, match="missing"):
        store.size("nope.bin")


def test_large_file_goes_up_in_chunks(store, emulator):
    data = payload(20 * MIB)
    progress = []
    store.write("big.bin", pieces(data, 300_000), progress=progress.append)
    puts = upload_puts(emulator)
    assert len(puts) == 20 and all(r.status in (200, 308) for r in puts)
    assert [r.upload_start for r in puts] == [i * MIB for i in range(20)]
    assert puts[-1].content_range == f"bytes {19 * MIB}-{20 * MIB - 1}/{20 * MIB}"
    assert sum(progress) == len(data)
    assert store.md5("big.bin") == hashlib.md5(data).hexdigest()


def test_chunks_are_consumed_lazily(store, emulator):
    piece = 64 * 1024
    gaps = []

    def source():
        sent = 0
        buf = bytearray(piece)
        for i in range(8 * MIB // piece):
            gaps.append(sent - emulator.received_bytes())
            buf[:] = bytes([i % 251]) * piece  # the producer reuses its buffer
            yield buf
            sent += piece

    store.write("lazy.bin", source())
    # Never more than one chunk (plus the piece in hand) ahead of what the server has.
    assert max(gaps) <= MIB + piece
    expected = b"".join(bytes([i % 251]) * piece for i in range(8 * MIB // piece))
    assert store.md5("lazy.bin") == hashlib.md5(expected).hexdigest()


def test_list_hides_unfinished_uploads(store, emulator):
    store.write("done.bin", [b"ok"])
    emulator.inject("quota", match="PUT /upload/", skip=1)

    def source():
        yield payload(MIB)
        assert [f.path for f in store.list("")] == ["done.bin"]  # first chunk is up, file is not
        yield payload(MIB)

    with pytest.raises(StoreError):
        store.write("partial.bin", source())
    assert [f.path for f in store.list("")] == ["done.bin"]


# -- faults ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["500", "503", "429", "rate_limit", "user_rate_limit"])
def test_transient_upload_faults_are_retried(store, emulator, kind):
    data = payload(3 * MIB + 5, seed=1)
    emulator.inject(kind, times=2, match="PUT /upload/", skip=1)
    emulator.inject(kind, match="POST /upload/")
    store.write("f.bin", pieces(data, MIB // 3))
    assert store.md5("f.bin") == hashlib.md5(data).hexdigest()
    assert store.verify("f.bin", hashlib.md5(data).hexdigest())
    puts = upload_puts(emulator)
    assert [r.status for r in puts if r.fault] == [int(kind) if kind.isdigit() else 403] * 2
    assert all(r.upload_start != 0 for r in puts[1:])  # resumed, never restarted


@pytest.mark.parametrize("kind", ["500", "503", "429", "rate_limit"])
def test_transient_metadata_and_download_faults_are_retried(store, emulator, kind):
    data = payload(2 * MIB + 3, seed=2)
    store.write("g.bin", [data])
    emulator.inject(kind, times=2, match="GET /drive/v2/files?")
    emulator.inject(kind, times=2, match="alt=media")
    emulator.inject(kind, match="GET /drive/v2/about")
    assert bytes(store.open_blob("g.bin")) == data
    assert store.quota()[0] == len(data)


def test_dropped_connection_resumes_from_the_acknowledged_offset(store, emulator):
    data = payload(4 * MIB + 100, seed=3)
    emulator.inject("drop", match="PUT /upload/", skip=2, after_bytes=300_000)
    store.write("r.bin", pieces(data, 1 << 16))
    assert store.md5("r.bin") == hashlib.md5(data).hexdigest()
    puts = upload_puts(emulator)
    dropped = next(i for i, r in enumerate(puts) if r.status == -1)
    assert puts[dropped].upload_start == 2 * MIB
    assert puts[dropped + 1].is_status_query and puts[dropped + 1].status == 308
    assert puts[dropped + 2].upload_start == 2 * MIB + 300_000  # resumed mid-chunk, not from 0
    assert [r.upload_start for r in puts].count(0) == 1


def test_lost_answer_to_the_last_chunk_is_recovered_by_a_status_query(store, emulator):
    data = payload(MIB + 10, seed=5)
    emulator.inject("drop", match="PUT /upload/", skip=1, after_bytes=10)  # all bytes arrive, no answer
    store.write("z.bin", [data])
    assert store.md5("z.bin") == hashlib.md5(data).hexdigest()
    puts = upload_puts(emulator)
    assert puts[-1].is_status_query and puts[-1].status == 200 and len(puts) == 3


def test_folder_twins_settle_on_the_oldest(emulator, tmp_path):
    first = emulator.add_folder("nbguard")
    emulator.add_folder("nbguard")  # a twin left by a retried insert or another process
    store = make_store(emulator, tmp_path)
    store.write("a", [b"1"])
    parent = next(f for f in emulator.files() if f["title"] == "test")["parents"][0]["id"]
    assert parent == first


def test_dropped_download_resumes(store, emulator):
    data = payload(3 * MIB, seed=4)
    store.write("d.bin", [data])
    emulator.inject("drop", match="alt=media", skip=1, after_bytes=1000)
    assert store.read("d.bin") == data
    media = [r for r in emulator.requests if r.query.get("alt") == "media"]
    assert [r.range for r in media] == ["bytes=0-1048575", "bytes=1048576-2097151", "bytes=1048576-2097151",
                                        "bytes=2097152-3145727"]


def test_full_drive_is_a_clear_error_and_leaves_no_file(emulator, tmp_path):
    small = DriveEmulator(quota_bytes=2 * MIB).start()
    try:
        store = make_store(small, tmp_path)
        with pytest.raises(StoreError, match=r"Google Drive is full \(storageQuotaExceeded\).*free space"):
            store.write("huge.bin", pieces(payload(5 * MIB), MIB))
        assert not store.exists("huge.bin") and small.open_uploads() == 0
        assert sum(1 for r in small.requests if r.fault is None and r.status == 403) == 1  # not retried
    finally:
        small.stop()


def test_injected_quota_fault_is_not_retried(store, emulator):
    emulator.inject("quota", times=5, match="PUT /upload/")
    with pytest.raises(StoreError, match="storageQuotaExceeded"):
        store.write("q.bin", [payload(MIB)])
    assert sum(1 for r in upload_puts(emulator) if r.fault == "quota") == 1
    assert not store.exists("q.bin") and emulator.open_uploads() == 0


def test_rate_limit_that_never_ends_gives_up(store, emulator):
    emulator.inject("rate_limit", times=100, match="GET /drive/v2/files")
    with pytest.raises(StoreError, match="rate-limiting.*after 5 attempts.*wait a few minutes"):
        store.list("")
    assert len(emulator.requests) == 1 + 5  # token + five tries


def test_revoked_credentials_say_how_to_fix_them(store, emulator):
    store.write("a", [b"x"])
    emulator.revoke()
    with pytest.raises(StoreError, match="NBGUARD_DRIVE_CREDENTIALS") as info:
        store.list("")
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_expired_access_token_is_refreshed(store, emulator):
    store.write("a", [b"x"])
    emulator.expire_tokens()
    store.write("b", [payload(2 * MIB)])
    assert store.read("b") == payload(2 * MIB) and emulator.token_requests == 2


def test_injected_401_is_refreshed_then_reported(store, emulator):
    emulator.inject("auth", match="GET /drive/v2/about")
    assert store.quota()[1] == emulator.quota_bytes
    emulator.inject("auth", times=10, match="GET /drive/v2/about")
    with pytest.raises(StoreError, match=r"rejected the credentials \(HTTP 401\)"):
        store.quota()


def test_slow_server_works(emulator, tmp_path):
    store = make_store(emulator, tmp_path, timeout=5)
    emulator.inject("slow", times=3, delay=0.15)
    store.write("s.bin", [payload(2 * MIB)])
    assert store.read("s.bin") == payload(2 * MIB)


def test_timeouts_are_retried(emulator, tmp_path):
    store = make_store(emulator, tmp_path, timeout=0.3)
    store.write("t.bin", [b"tiny"])
    emulator.inject("slow", delay=1.0, match="GET /drive/v2/files")
    assert store.read("t.bin") == b"tiny"


# -- folders and URLs ------------------------------------------------------------------------------------------
def test_folder_ids_are_cached_per_instance(store, emulator, tmp_path):
    store.write("runs/a", [b"1"])
    lookups = len([r for r in emulator.requests if "mimeType = " in r.query.get("q", "")])
    store.write("runs/b", [b"2"])
    assert len([r for r in emulator.requests if "mimeType = " in r.query.get("q", "")]) == lookups
    other = make_store(emulator, tmp_path)  # a fresh instance looks them up again
    assert other.read("runs/a") == b"1"
    assert len([r for r in emulator.requests if "mimeType = " in r.query.get("q", "")]) > lookups


def test_stale_folder_cache_recovers(store, emulator):
    store.write("runs/a", [b"1"])
    runs = next(f["id"] for f in emulator.files() if f["title"] == "runs")
    with emulator._lock:
        emulator._remove(emulator._files[runs])  # deleted behind the store's back
    store.write("runs/b", [b"2"])
    assert store.read("runs/b") == b"2"


def test_root_and_folder_id_urls(emulator, tmp_path):
    folder = emulator.add_folder("shared")
    by_id = make_store(emulator, tmp_path, url=f"gdrive://{folder}/sub")
    by_id.write("x", [b"1"])
    by_name = make_store(emulator, tmp_path, url="gdrive://root/shared/sub")
    assert by_name.read("x") == b"1"
    looks_like_id = "checkpoints2026experimentA"  # a folder name, not an id: Drive answers 404
    named = make_store(emulator, tmp_path, url=f"gdrive://{looks_like_id}")
    named.write("y", [b"2"])
    assert any(f["title"] == looks_like_id for f in emulator.files())


def test_open_store_routes_gdrive_urls_through_local_staging(emulator, monkeypatch, tmp_path):
    import json

    from nbguard.stores import open_store
    from nbguard.stores.replica import ReplicatedStore

    monkeypatch.setenv("NBGUARD_DRIVE_CREDENTIALS", json.dumps(emulator.authorized_user_info()))
    monkeypatch.setenv("NBGUARD_DRIVE_API_ROOT", emulator.url)
    monkeypatch.setenv("NBGUARD_STAGING", str(tmp_path / "staging"))
    store = open_store("gdrive://nbguard/via-open-store")
    assert isinstance(store, ReplicatedStore) and isinstance(store.remote, DriveStore)
    store.write("a", [b"ok"])
    assert store.read("a") == b"ok"
    assert store.flush(30) and store.state("a") == "verified"
    assert store.remote.read("a") == b"ok"
    store.close(5)
