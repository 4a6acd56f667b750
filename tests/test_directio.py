"""Large blobs: written in 16 MiB pieces around the page cache (O_DIRECT) with the header last, read
back straight into fresh memory by a read-ahead thread. The same files and the same results with
direct I/O off (file systems that refuse it), damage in the middle of a piece found, a write that
fails half-way leaving nothing behind."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from nbguard import Guard, LocalStore, load
from nbguard.errors import CorruptSnapshotError, StoreError
from nbguard.format.blobfile import parse_header
from nbguard.stores import TEMP_PREFIX

MiB = 2**20


def big_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "odd": torch.randint(0, 255, (16 * MiB + 4097,), dtype=torch.uint8, generator=gen),  # a partial block
        "wide": torch.randn(3 * MiB + 5, dtype=torch.float64, generator=gen),  # 24 MiB: two pieces
        "small": torch.randn(100, generator=gen),
        "half": torch.randn(MiB + 3, generator=gen).to(torch.float16),
    }


@pytest.fixture(params=["direct", "buffered"])
def direct_io(request, monkeypatch):
    monkeypatch.setenv("NBGUARD_DIRECT_IO", "1" if request.param == "direct" else "0")
    return request.param


def blobs(root) -> dict[str, bytes]:
    out = {}
    for folder, _, files in os.walk(os.path.join(root, "blobs")):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                out[name] = f.read()
    return out


def test_large_tensors_round_trip_bit_for_bit(tmp_path, direct_io):
    state = big_state()
    guard = Guard(tmp_path, run="big", report=None)
    guard.save({"tensors": state}, wait=True).result()
    restored = load(tmp_path, run="big").restore({}).values["tensors"]
    assert restored.keys() == state.keys()
    for key, tensor in state.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key
    # Restored memory is private and writable, and torch owns it (change tracking trusts it).
    restored["wide"].add_(1)
    assert restored["wide"].untyped_storage().resizable()
    guard.close()


def test_direct_and_buffered_writes_make_the_same_files(tmp_path, monkeypatch):
    state = big_state(1)
    for mode in ("1", "0"):
        monkeypatch.setenv("NBGUARD_DIRECT_IO", mode)
        guard = Guard(tmp_path / mode, run="big", report=None)
        guard.save({"tensors": state}, wait=True).result()
        guard.close()
    direct, buffered = blobs(tmp_path / "1"), blobs(tmp_path / "0")
    assert direct == buffered and len(direct) == 1
    (data,) = direct.values()
    header = parse_header(data)
    assert header.data_start % 4096 == 0  # the data section starts on a block boundary


def test_a_flipped_byte_in_the_middle_of_a_piece_is_found(tmp_path, direct_io):
    guard = Guard(tmp_path, run="big", report=None)
    guard.save({"tensors": big_state()}, wait=True).result()
    guard.close()
    (path,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "blobs") for f in fs]
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 20 * MiB)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    snapshot = load(tmp_path, run="big")
    with pytest.raises(CorruptSnapshotError, match="damaged"):
        snapshot.restore({})
    with pytest.raises(CorruptSnapshotError, match="damaged"):
        snapshot.verify()


def test_a_large_write_failing_half_way_leaves_nothing_and_the_last_snapshot_restores(tmp_path, direct_io):
    full = {"on": False, "writes": 0}

    def hook(kind: str, path: str) -> None:
        if kind == "write" and path.startswith("blobs/") and full["on"]:
            full["writes"] += 1
            if full["writes"] == 3:  # two 16 MiB pieces are on their way to the disk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    store = LocalStore(tmp_path, on_event=hook)
    reports: list[str] = []
    guard = Guard(store, run="big", report=reports.append)
    state = big_state()
    good = guard.save({"tensors": state}, wait=True).result()
    full["on"] = True
    state["odd"].add_(1)
    failed = guard.save({"tensors": state}, wait=True)
    assert isinstance(failed.exception(), StoreError)
    assert "the disk is full" in reports[-1]
    leftovers = [f for _, _, fs in os.walk(tmp_path) for f in fs if f.startswith(TEMP_PREFIX)]
    assert leftovers == []
    assert guard.latest().id == good.id
    restored = load(tmp_path, run="big").restore({}).values["tensors"]
    assert torch.equal(restored["odd"], state["odd"] - 1)
    guard.close()


def test_restoring_the_latest_good_snapshot_reads_each_entry_once(tmp_path):
    class Counting(LocalStore):
        entries = 0

        def open_reader(self, path):
            reader = super().open_reader(path)
            read_entry = reader.read_entry

            def counted(*args, **kwargs):
                Counting.entries += 1
                return read_entry(*args, **kwargs)

            reader.read_entry = counted
            return reader

    guard = Guard(Counting(tmp_path), run="big", report=None)
    state = big_state()
    guard.save({"tensors": state}, wait=True).result()
    Counting.entries = 0
    report = guard.restore({})  # finds the newest intact snapshot (every byte checked), then restores it
    assert torch.equal(report.values["tensors"]["odd"], state["odd"])
    assert Counting.entries == len(guard.load().manifest["storages"])
    guard.close()


def test_a_front_larger_than_a_bounce_buffer_is_written(tmp_path):
    """A header of more than 16 MiB (a state of ~100,000 tensors) goes through a buffer of its own."""
    from nbguard.stores import directio

    path = str(tmp_path / "f")
    fd = directio.open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    direct = fd is not None
    if fd is None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    front = bytes(range(256)) * (17 * MiB // 256)  # 17 MiB, a multiple of the block size
    tail = os.urandom(5 * MiB + 123)
    try:
        out = directio.SequentialWriter(fd, direct=direct, start=len(front))
        out.write(memoryview(tail))
        assert out.finish() == len(front) + len(tail)
        out.pwrite_block(front, 0)
        out.close()
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == front + tail


# -- copying checked bytes from the page cache (issue 17 item 2) -------------------------------------
def _hashed_file(tmp_path, nbytes: int = 40 * MiB + 123):
    from nbguard.stores.filereader import FileReader

    data = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "blob.bin"
    path.write_bytes(data.numpy().tobytes())
    reader = FileReader(str(path))
    return reader, data, path


def test_checked_bytes_are_copied_from_the_page_cache_on_two_threads(tmp_path):
    """After a hash pass through the open file, every byte comes from the cache (True), in pieces
    on two threads, and lands exactly; evicted pages come from the disk instead, and it says so."""
    import xxhash

    from nbguard.stores.directio import byte_view

    reader, data, path = _hashed_file(tmp_path)
    try:
        reader.hash_range(0, len(data), xxhash.xxh3_128())
        out = torch.zeros_like(data)
        assert reader.copy_cached(byte_view(out), 0) is True
        assert torch.equal(out, data)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        out.zero_()
        assert reader.copy_cached(byte_view(out), 0) is False
        assert torch.equal(out, data)
    finally:
        reader.close()


def test_a_file_written_after_its_hash_is_refused_before_a_byte_is_copied(tmp_path):
    import xxhash

    from nbguard.format.blobfile import BlobHeader, Entry, copy_checked_into
    from nbguard.stores.directio import byte_view

    reader, data, path = _hashed_file(tmp_path, 3 * MiB)
    try:
        digest = xxhash.xxh3_128(data.numpy()).hexdigest()
        header = BlobHeader(b"", 0, {"e": Entry("e", "U8", (len(data),), 0, len(data), digest)})
        identity = reader.opened
        out = torch.zeros_like(data)
        copy_checked_into(reader, header, "e", byte_view(out), identity)
        assert torch.equal(out, data)
        with open(path, "r+b") as f:  # the same inode, one byte changed
            f.seek(5)
            f.write(b"\x00" if data[5] else b"\x01")
        out.zero_()
        with pytest.raises(CorruptSnapshotError, match="replaced or written after it was checked"):
            copy_checked_into(reader, header, "e", byte_view(out), identity)
        assert not out.any()
    finally:
        reader.close()


def test_bytes_not_in_the_cache_are_hashed_again(tmp_path, monkeypatch):
    """Where pages left the cache, the copy's bytes came from the disk: hashed, and damage found."""
    import xxhash

    from nbguard.format.blobfile import BlobHeader, Entry, copy_checked_into
    from nbguard.stores.directio import byte_view
    from nbguard.stores.filereader import FileReader

    reader, data, _ = _hashed_file(tmp_path, 3 * MiB)
    try:
        wrong = xxhash.xxh3_128(b"something else").hexdigest()
        header = BlobHeader(b"", 0, {"e": Entry("e", "U8", (len(data),), 0, len(data), wrong)})
        monkeypatch.setattr(FileReader, "_nowait", lambda self, view, offset: False)
        out = torch.zeros_like(data)  # (kept: byte_view does not keep its tensor alive)
        with pytest.raises(CorruptSnapshotError, match="hash mismatch"):
            copy_checked_into(reader, header, "e", byte_view(out), reader.opened)
        assert torch.equal(out, data)
    finally:
        reader.close()


def _resident_pages(tensor: torch.Tensor) -> tuple[int, int]:
    """(in memory, all) of the tensor's whole pages (mincore)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    start = -(-tensor.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    pages = (end - start) // mmap.PAGESIZE
    vector = ctypes.create_string_buffer(pages)
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vector) == 0, ctypes.get_errno()
    return sum(byte & 1 for byte in vector.raw), pages


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only (MADV_POPULATE_WRITE, mincore)")
def test_memory_a_restore_exchanged_in_untouched_is_faulted_in_before_the_next_save():
    """A model made with torch.empty (or to_empty) hands memory nothing touched to the staging
    buffers a restore exchanges; the prefault that follows a restore faults it in, contents unchanged."""
    from nbguard.engine.staging import StagingArea
    from nbguard.stores.directio import populate

    untouched = torch.empty(32 * 2**20, dtype=torch.uint8)  # a fresh mapping: no page in memory yet
    if _resident_pages(untouched)[0] > 16:
        pytest.skip("the allocator handed out memory already in use")
    area = StagingArea()
    area._buffers["w"] = untouched  # what the exchange leaves in the staging area
    area.prefault({"w": torch.ones(8 * 2**20)})  # the live tensor: same size, 32 MiB
    area.wait_prefault()
    assert area._buffers["w"] is untouched
    resident, pages = _resident_pages(untouched)
    assert resident == pages > 8000
    filled = torch.full((4096 * 4,), 7, dtype=torch.uint8)
    populate(filled)
    assert bool((filled == 7).all())
