"""ReplicatedStore on real folders: local first, copied in order, dropped mounts survived."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
import time
import tracemalloc
from collections.abc import Iterable

import pytest

from nbguard.errors import StoreError
from nbguard.stores import Buffer, LocalStore, MemoryStore, Progress, Store, describe_os_error
from nbguard.stores.replica import (
    FAILED,
    LOCAL,
    MISSING,
    REMOTE_ONLY,
    SYNC_PENDING,
    UNCHECKED,
    UPLOADING,
    VERIFIED,
    ReplicatedStore,
)
from nbguard.stores.replica.remote import REMOUNT_FIX, infer_remote_kind, mount_anchor

FAST = dict(retry_interval=0.02, max_retry_interval=0.1, listing_ttl=0.0)


class RecordingStore(LocalStore):
    """A real LocalStore that records its writes and deletes, and can hold a write halfway."""

    def __init__(self, root: os.PathLike[str] | str):
        super().__init__(root)
        self.ops: list[tuple[str, str]] = []
        self.chunk_sizes: dict[str, list[int]] = {}
        self.hold: dict[str, threading.Event] = {}  # path -> released when set
        self.holding = threading.Event()  # set once a held write is waiting

    def write(self, path: str, chunks: Iterable[Buffer], progress: Progress | None = None) -> None:
        sizes = self.chunk_sizes.setdefault(path, [])

        def recorded() -> Iterable[Buffer]:
            for n, chunk in enumerate(chunks):
                sizes.append(memoryview(chunk).nbytes)
                yield chunk
                if n == 0 and path in self.hold:
                    self.holding.set()
                    assert self.hold[path].wait(10)

        super().write(path, recorded(), progress)
        self.ops.append(("write", path))

    def delete(self, path: str) -> None:
        super().delete(path)
        self.ops.append(("delete", path))

    def writes(self) -> list[str]:
        return [path for op, path in self.ops if op == "write"]


class BrokenStore(LocalStore):
    """A remote whose every write fails, as a remote with an exhausted quota does."""

    def __init__(self, root: os.PathLike[str] | str):
        super().__init__(root)
        self.attempts = 0

    def write(self, path: str, chunks: Iterable[Buffer], progress: Progress | None = None) -> None:
        self.attempts += 1
        raise StoreError("the Drive storage quota is exceeded: free some space")


class Md5Store(LocalStore):
    """A remote that offers the Drive API's md5Checksum (optionally a wrong one)."""

    def __init__(self, root: os.PathLike[str] | str, lie: bool = False):
        super().__init__(root)
        self.lie = lie
        self.asked: list[str] = []

    def md5(self, path: str) -> str | None:
        self.asked.append(path)
        return "0" * 32 if self.lie else hashlib.md5(self.read(path)).hexdigest()


def blob(name: str) -> str:
    return f"blobs/{name[:2]}/{name}.safetensors"


def manifest(n: int, run: str = "r1") -> str:
    return f"runs/{run}/snapshots/{n:06d}.json"


def put(store: Store, path: str, data: bytes) -> None:
    store.write(path, [data])


@pytest.fixture
def reports() -> list[str]:
    return []


@pytest.fixture
def make(tmp_path, reports):
    made: list[ReplicatedStore] = []

    def make(remote: Store | None = None, local: Store | None = None, **options) -> ReplicatedStore:
        local = local or LocalStore(tmp_path / "local")
        remote = remote or RecordingStore(tmp_path / "remote")
        store = ReplicatedStore(local, remote, report=reports.append, **{**FAST, **options})
        made.append(store)
        return store

    yield make
    for store in made:
        store.close(timeout=1)


def test_is_a_store(make):
    assert isinstance(make(), Store)


def test_write_lands_locally_then_remote_in_order(tmp_path, make):
    remote = RecordingStore(tmp_path / "remote")
    store = make(remote, resync=False)  # the start-up scan may take a blob ahead; not the point here
    events: list[tuple[str, str]] = []
    store.on_change(lambda path, state: events.append((path, state)))
    remote.hold[blob("aa01")] = release = threading.Event()

    put(store, blob("aa01"), b"weights-1" * 100)
    put(store, blob("bb02"), b"weights-2" * 100)
    put(store, manifest(1), b'{"blobs": ["aa01", "bb02"]}')

    assert store.local.read(manifest(1)) == b'{"blobs": ["aa01", "bb02"]}'
    assert remote.holding.wait(5)
    assert store.state(blob("aa01")) == UPLOADING
    assert store.state(manifest(1)) == LOCAL
    assert not remote.exists(manifest(1))
    assert store.pending() == 3
    release.set()

    assert store.flush(timeout=10)
    assert remote.writes() == [blob("aa01"), blob("bb02"), manifest(1)]
    for path in (blob("aa01"), blob("bb02"), manifest(1)):
        assert remote.read(path) == store.local.read(path)
        assert store.state(path) == VERIFIED
        assert [s for p, s in events if p == path] == [LOCAL, UPLOADING, VERIFIED]
    assert store.pending() == 0 and store.last_error is None


def test_mount_mode_never_claims_more_than_the_mount(tmp_path, make):
    store = make(RecordingStore(tmp_path / "drive" / "nbguard"), remote_kind="mount")
    put(store, blob("cc03"), b"x" * 10)
    put(store, manifest(1), b"{}")
    assert store.flush(timeout=10)
    assert store.state(blob("cc03")) == SYNC_PENDING
    assert store.state(manifest(1)) == SYNC_PENDING


def test_remote_kind_is_inferred(tmp_path):
    assert infer_remote_kind(LocalStore("/content/drive/MyDrive/nbguard/nb")) == "mount"
    assert mount_anchor(LocalStore("/content/drive/MyDrive/nbguard/nb")) == "/content/drive/MyDrive"
    assert infer_remote_kind(Md5Store(tmp_path / "api")) == "api"
    assert infer_remote_kind(LocalStore(tmp_path / "other")) == "other"
    assert infer_remote_kind(MemoryStore()) == "other"


def test_api_remote_is_verified_with_its_md5(tmp_path, make):
    remote = Md5Store(tmp_path / "api")
    store = make(remote)
    assert store.remote_kind == "api"
    put(store, blob("dd04"), b"tensor bytes")
    assert store.flush(timeout=10)
    assert store.state(blob("dd04")) == VERIFIED
    assert remote.asked == [blob("dd04")]


def test_a_copy_that_does_not_match_is_failed_and_retried(tmp_path, make, reports):
    store = make(Md5Store(tmp_path / "api", lie=True))
    put(store, blob("ee05"), b"tensor bytes")
    assert not store.flush(timeout=0.3)
    assert store.state(blob("ee05")) in (FAILED, UPLOADING)  # between retries, or in one
    assert "differs from the local file" in store.last_error
    assert len(reports) == 1
    store.remote.lie = False
    assert store.flush(timeout=10)
    assert store.state(blob("ee05")) == VERIFIED
    assert "works again" in reports[-1]


def test_content_already_on_the_remote_is_not_uploaded_again(tmp_path, make):
    remote = RecordingStore(tmp_path / "remote")
    put(LocalStore(remote.root), blob("ff06"), b"same bytes")
    store = make(remote)
    put(store, blob("ff06"), b"same bytes")
    assert store.flush(timeout=10)
    assert remote.writes() == []
    assert store.state(blob("ff06")) == VERIFIED  # read back and compared


def test_mount_that_vanishes_mid_upload_and_comes_back(tmp_path, make, reports):
    mount = tmp_path / "drive"
    mount.mkdir()
    remote = RecordingStore(mount / "nbguard")
    store = make(remote, remote_kind="mount")
    big = os.urandom(3 << 20)
    remote.hold[blob("aa10")] = release = threading.Event()
    put(store, blob("aa10"), big)
    assert remote.holding.wait(5)

    os.rename(mount, tmp_path / "drive-away")  # the mount drops while a file is half copied
    release.set()
    put(store, manifest(1), b'{"blobs": ["aa10"]}')  # training keeps saving
    put(store, blob("bb11"), b"more")
    deadline = time.monotonic() + 5
    while not reports and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # several retries happen meanwhile; still one report
    assert len(reports) == 1 and REMOUNT_FIX in reports[0]
    assert store.state(blob("aa10")) == FAILED
    assert not store.flush(timeout=0.1)
    assert store.local.read(blob("aa10")) == big
    assert store.read(manifest(1)) == b'{"blobs": ["aa10"]}'
    assert not (tmp_path / "drive").exists()  # nothing recreated where the mount was

    os.rename(tmp_path / "drive-away", mount)  # remounted
    assert store.flush(timeout=10)
    assert "mount is back" in reports[-1]
    for path in (blob("aa10"), manifest(1), blob("bb11")):
        assert remote.read(path) == store.local.read(path)
        assert store.state(path) == SYNC_PENDING
    assert remote.writes().index(blob("aa10")) < remote.writes().index(manifest(1))
    visible = {f.path for f in remote.list("blobs/aa")}
    assert visible == {blob("aa10")}  # the interrupted temp file is not visible
    leftovers = store.temp_files("blobs/aa")
    assert len(leftovers) == 1 and leftovers[0].path.startswith("blobs/aa/.tmp-")
    store.delete(leftovers[0].path)  # what Catalog.gc does with them
    assert store.flush(timeout=10)
    assert remote.temp_files("blobs/aa") == [] and remote.read(blob("aa10")) == big


def test_mount_gone_between_copies_is_not_recreated_on_the_vm_disk(tmp_path, make, reports):
    mount = tmp_path / "drive"
    mount.mkdir()
    store = make(RecordingStore(mount / "nbguard"), remote_kind="mount")
    put(store, blob("aa15"), b"1")
    assert store.flush(timeout=10)
    os.rename(mount, tmp_path / "drive-away")
    put(store, blob("bb16"), b"2")
    assert not store.flush(timeout=0.2)
    assert len(reports) == 1 and REMOUNT_FIX in reports[0]
    assert not mount.exists()  # a remount onto a non-empty folder would fail
    os.rename(tmp_path / "drive-away", mount)
    assert store.flush(timeout=10)
    assert store.remote.read(blob("bb16")) == b"2"


def test_mount_replaced_by_a_file(tmp_path, make, reports):
    mount = tmp_path / "drive"
    mount.mkdir()
    remote = RecordingStore(mount / "nbguard")
    store = make(remote, remote_kind="mount")
    put(store, blob("aa20"), b"one")
    assert store.flush(timeout=10)

    shutil.rmtree(mount)
    mount.write_bytes(b"not a folder")
    put(store, blob("bb21"), b"two")
    put(store, manifest(2), b"{}")
    assert not store.flush(timeout=0.3)
    assert len(reports) == 1 and REMOUNT_FIX in reports[0]
    assert {f.path for f in store.list("blobs/bb")} == {blob("bb21")}  # local listing still works

    mount.unlink()
    mount.mkdir()
    assert store.flush(timeout=10)
    assert remote.read(blob("bb21")) == b"two" and remote.exists(manifest(2))


class DisconnectedMount(LocalStore):
    """A FUSE mount whose endpoint is disconnected while its folder still exists."""

    connected = True

    def write(self, path: str, chunks: Iterable[Buffer], progress: Progress | None = None) -> None:
        if not self.connected:
            exc = OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN), self.root)
            raise StoreError(describe_os_error(exc, self.root)) from exc
        super().write(path, chunks, progress)


def test_disconnected_mount_endpoint(tmp_path, make, reports):
    remote = DisconnectedMount(tmp_path / "drive")
    remote.connected = False
    store = make(remote, remote_kind="mount")
    put(store, blob("ac01"), b"1")
    put(store, manifest(1), b"{}")
    assert not store.flush(timeout=0.3)
    assert len(reports) == 1 and "Transport endpoint is not connected" in reports[0] and REMOUNT_FIX in reports[0]
    remote.connected = True
    assert store.flush(timeout=10)
    assert remote.exists(manifest(1)) and store.state(manifest(1)) == SYNC_PENDING


def test_failing_remote_never_reaches_the_training_side(tmp_path, make, reports):
    remote = BrokenStore(tmp_path / "remote")
    store = make(remote)
    for n in range(5):
        put(store, blob(f"ab{n:02d}"), b"w" * 100)  # never raises
    put(store, manifest(1), b"{}")
    assert not store.flush(timeout=0.4)
    assert remote.attempts >= 3  # retried with backoff
    assert len(reports) == 1 and "quota" in reports[0]
    assert store.state(blob("ab00")) == FAILED
    assert store.state(manifest(1)) == LOCAL
    assert "quota" in store.last_error
    assert store.pending() == 6
    assert store.read(manifest(1)) == b"{}"


def test_remote_only_files_are_listed_and_downloaded(tmp_path, make):
    remote = RecordingStore(tmp_path / "remote")
    weights = os.urandom(100_000)
    put(LocalStore(remote.root), blob("cd30"), weights)
    put(LocalStore(remote.root), manifest(7), b'{"epoch": 7}')
    store = make(remote)  # a fresh runtime: nothing local

    assert [f.path for f in store.list("runs/r1/snapshots")] == [manifest(7)]
    assert store.folders("runs") == ["r1"]
    assert store.exists(blob("cd30")) and store.state(blob("cd30")) == REMOTE_ONLY
    assert store.read(manifest(7)) == b'{"epoch": 7}'
    seen: list[int] = []
    assert bytes(store.open_blob(blob("cd30"), progress=seen.append)) == weights
    assert sum(seen) == len(weights)
    assert store.local.read(blob("cd30")) == weights  # kept locally for the next read
    assert store.state(blob("cd30")) == VERIFIED
    assert store.pending() == 0 and remote.writes() == []
    with pytest.raises(StoreError):
        store.read(manifest(8))


def test_restart_uploads_what_is_missing_blobs_first(tmp_path, make):
    local = LocalStore(tmp_path / "local")
    remote = RecordingStore(tmp_path / "remote")
    for path in (blob("aa40"), manifest(1)):  # the first snapshot made it to the remote
        put(local, path, b"1")
        put(LocalStore(remote.root), path, b"1")
    # a second snapshot was interrupted: manifests are older than some blobs on purpose
    put(local, manifest(2), b"2")
    put(local, "runs/r1/pins/000002", b"")
    put(local, blob("bb41"), b"22")
    put(local, manifest(3), b"3")
    put(local, blob("cc42"), b"333")
    for age, path in enumerate(reversed([manifest(2), "runs/r1/pins/000002", blob("bb41"), manifest(3), blob("cc42")])):
        os.utime(local._abs(path), (1000 - age, 1000 - age))

    store = make(remote, local, resync=False)
    assert store.state(manifest(2)) == LOCAL
    assert store.state(manifest(1)) == UNCHECKED
    store.resync()
    assert store.flush(timeout=10)
    assert remote.writes() == [blob("bb41"), blob("cc42"), manifest(2), manifest(3), "runs/r1/pins/000002"]
    assert store.state(manifest(3)) == VERIFIED


def test_first_write_after_a_restart_finishes_the_old_uploads_first(tmp_path, make):
    local = LocalStore(tmp_path / "local")
    remote = RecordingStore(tmp_path / "remote")
    put(local, blob("aa50"), b"shared by both snapshots")
    put(local, manifest(1), b"1")
    store = make(remote, local)  # resync=True by default
    put(store, manifest(2), b"2")  # refers to aa50, which it does not write again
    assert store.flush(timeout=10)
    writes = remote.writes()
    assert writes[0] == blob("aa50") and sorted(writes[1:]) == [manifest(1), manifest(2)]


def test_old_manifest_waits_for_its_blob_written_again_after_a_restart(tmp_path, make):
    local = LocalStore(tmp_path / "local")
    remote = RecordingStore(tmp_path / "remote")
    put(local, blob("aa51"), b"unchanged weights")
    put(local, manifest(1), b"1 refers to aa51")  # the upload was cut short before either got there
    store = make(remote, local)
    put(store, blob("aa51"), b"unchanged weights")  # written again (same bytes) before the scan runs
    put(store, manifest(2), b"2 refers to aa51")
    assert store.flush(timeout=10)
    writes = remote.writes()
    assert writes.index(blob("aa51")) < min(writes.index(manifest(1)), writes.index(manifest(2)))


def test_delete_reaches_both_sides(tmp_path, make):
    remote = RecordingStore(tmp_path / "remote")
    store = make(remote)
    put(store, blob("aa60"), b"a")
    put(store, manifest(1), b"{}")
    assert store.flush(timeout=10)
    remote.hold[blob("zz99")] = release = threading.Event()
    put(store, blob("zz99"), b"z")  # keeps the uploader busy
    assert remote.holding.wait(5)

    store.delete(manifest(1))
    assert not store.local.exists(manifest(1))
    assert store.list("runs/r1/snapshots") == []  # hidden at once, though the remote still has it
    assert not store.exists(manifest(1)) and store.state(manifest(1)) == MISSING
    with pytest.raises(StoreError):
        store.read(manifest(1))
    release.set()
    assert store.flush(timeout=10)
    assert not remote.exists(manifest(1))
    assert ("delete", manifest(1)) in remote.ops


def test_delete_of_a_queued_path_cancels_its_upload(tmp_path, make):
    remote = RecordingStore(tmp_path / "remote")
    store = make(remote)
    remote.hold[blob("aa70")] = release = threading.Event()
    put(store, blob("aa70"), b"first")
    assert remote.holding.wait(5)
    put(store, blob("bb71"), b"doomed")
    assert store.pending() == 2
    store.delete(blob("bb71"))
    assert store.pending() == 2  # the upload left the queue; the remote delete joined it
    release.set()
    assert store.flush(timeout=10)
    assert blob("bb71") not in remote.writes()
    assert not remote.exists(blob("bb71")) and not store.exists(blob("bb71"))


def test_rewritten_manifest_follows_the_blobs_written_since(tmp_path, make):
    remote = RecordingStore(tmp_path / "remote")
    store = make(remote)
    remote.hold[blob("aa80")] = release = threading.Event()
    put(store, blob("aa80"), b"a")
    assert remote.holding.wait(5)
    put(store, manifest(1), b"v1")
    put(store, blob("bb81"), b"b")
    put(store, manifest(1), b"v2 refers to bb81")
    put(store, blob("aa80"), b"a")  # a blob written again keeps its place
    release.set()
    assert store.flush(timeout=10)
    assert remote.writes() == [blob("aa80"), blob("bb81"), manifest(1)]
    assert remote.read(manifest(1)) == b"v2 refers to bb81"


def test_file_rewritten_while_in_flight_is_copied_again(tmp_path, make):
    remote = RecordingStore(tmp_path / "remote")
    store = make(remote)
    events: list[str] = []
    store.on_change(lambda path, state: events.append(state) if path == manifest(1) else None)
    remote.hold[manifest(1)] = release = threading.Event()
    put(store, manifest(1), b"old")
    assert remote.holding.wait(5)
    put(store, manifest(1), b"new")
    release.set()
    assert store.flush(timeout=10)
    assert remote.read(manifest(1)) == b"new"
    assert events == [LOCAL, UPLOADING, LOCAL, UPLOADING, VERIFIED]  # the old copy never claimed "verified"


def test_large_file_is_streamed_in_chunks(tmp_path, make):
    remote = RecordingStore(tmp_path / "remote")
    store = make(remote, chunk_size=4 << 20)
    part = os.urandom(1 << 20)
    tracemalloc.start()
    try:
        store.write(blob("ee90"), (part for _ in range(64)))
        assert store.flush(timeout=20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    sizes = remote.chunk_sizes[blob("ee90")]
    assert sum(sizes) == 64 << 20 and max(sizes) <= 4 << 20 and len(sizes) == 16
    assert peak < 16 << 20  # never the whole 64 MiB in memory
    assert store.state(blob("ee90")) == VERIFIED


def test_listing_failure_falls_back_to_local(tmp_path, make, reports):
    class Unlistable(LocalStore):
        def list(self, folder: str):
            raise StoreError("the Drive API answered 500")

    store = make(Unlistable(tmp_path / "remote"))
    put(store.local, manifest(1), b"{}")
    assert [f.path for f in store.list("runs/r1/snapshots")] == [manifest(1)]
    assert [f.path for f in store.list("runs/r1/snapshots")] == [manifest(1)]
    assert len(reports) == 1 and "500" in reports[0]


def test_concurrent_writers_and_readers(tmp_path, make):
    store = make()
    errors: list[BaseException] = []

    def writer(prefix: str) -> None:
        try:
            for n in range(30):
                put(store, blob(f"{prefix}{n:03d}"), f"{prefix}{n}".encode())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in ("aa", "bb")]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        store.list("blobs/aa")
        store.state(blob("aa000"))
    assert not errors
    assert store.flush(timeout=20)
    remote_files = {f.path for folder in ("blobs/aa", "blobs/bb") for f in store.remote.list(folder)}
    assert len(remote_files) == 60


def test_close_stops_the_uploader_and_a_later_write_restarts_it(make):
    store = make()
    put(store, blob("aa01"), b"1")
    assert store.close(timeout=10)
    assert not store._uploader.running
    put(store, blob("bb02"), b"2")
    assert store.flush(timeout=10)
    assert store.state(blob("bb02")) == VERIFIED


def test_a_broken_listener_is_reported_and_ignored(make, reports):
    store = make()
    unsubscribe = store.on_change(lambda path, state: 1 / 0)
    put(store, blob("aa01"), b"1")
    assert store.flush(timeout=10)
    assert store.state(blob("aa01")) == VERIFIED
    assert len(reports) == 1 and "listener" in reports[0]
    unsubscribe()
