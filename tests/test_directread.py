"""A restore's storages read around the page cache (``stores/directread.py``): every byte lands in
its range's memory and is hashed there, pieces already in the page cache are copied from it, a
failed check stops the readers, a short file is found, and file systems or readers that cannot read
directly go through the page cache with the same results."""

from __future__ import annotations

import errno
import os
import sys
import threading

import pytest
import torch
import xxhash

from nbguard.errors import CorruptSnapshotError
from nbguard.format.blobfile import BufferReader
from nbguard.stores import directio, directread
from nbguard.stores.directio import byte_view
from nbguard.stores.directread import read_ranges_direct
from nbguard.stores.filereader import FileReader, ReadRange

MiB = 2**20
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_DIRECT and mincore are Linux's")


def _write(path, nbytes: int, seed: int) -> bytes:
    raw = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    data = raw.numpy().tobytes()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cache(path) -> None:
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


@pytest.fixture
def files(tmp_path):
    """Two blob-like files, evicted from the page cache; skipped where this file system refuses O_DIRECT."""
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    raws = [_write(first, 60 * MiB + 77, 1), _write(second, 9 * MiB + 3, 2)]
    fd = directio.open_direct(str(first), os.O_RDONLY)
    if fd is None:
        pytest.skip("this file system refuses O_DIRECT")
    os.close(fd)
    for path in (first, second):
        _evict(path)
    readers = [FileReader(str(first)), FileReader(str(second))]
    yield readers, raws, (first, second)
    for reader in readers:
        reader.close()


# (file, offset, bytes), sorted as on the disk: unaligned starts and ends, a range spanning several
# 4 MiB pieces, two ranges sharing a piece with a gap between them, an empty one, a tiny one
SPANS = [(0, 0, 10), (0, 4096 + 3, 9 * MiB), (0, 9 * MiB + 5000, 0), (0, 9 * MiB + 6000, 50 * MiB),
         (1, 17, 5 * MiB + 1), (1, 5 * MiB + 100, 4 * MiB - 97)]


def _ranges(readers, raws, finished, failing: int | None = None):
    targets = [torch.zeros(nbytes, dtype=torch.uint8) for _, _, nbytes in SPANS]
    ranges = []
    for index, ((file, offset, _), target) in enumerate(zip(SPANS, targets, strict=True)):
        hasher = xxhash.xxh3_128()

        def finish(index=index, hasher=hasher):
            finished.append((index, hasher.hexdigest()))
            if index == failing:
                raise CorruptSnapshotError("blob entry 'x' is damaged (hash mismatch)")
        ranges.append(ReadRange(readers[file], offset, byte_view(target), hasher, finish))
    expected = [raws[file][offset:offset + nbytes] for file, offset, nbytes in SPANS]
    return ranges, targets, expected


def test_every_byte_lands_by_dma_and_is_hashed_where_it_landed(files):
    readers, raws, paths = files
    finished: list[tuple[int, str]] = []
    ranges, targets, expected = _ranges(readers, raws, finished)
    seen: list[int] = []
    threads = {t.name for t in threading.enumerate()}
    before = _read_bytes()
    counts = read_ranges_direct(ranges, seen.append)
    assert [bytes(t.numpy()) for t in targets] == expected
    assert finished == [(i, xxhash.xxh3_128(raw).hexdigest()) for i, raw in enumerate(expected)]
    assert sum(seen) == sum(len(raw) for raw in expected)
    # read around the page cache: every piece by DMA, none of the files' pages left cached
    assert counts.cached == 0 and counts.direct >= sum(len(raw) for raw in expected)
    assert _read_bytes() - before >= counts.direct
    for reader in readers:
        assert not any(_cached(reader, at, MiB) for at in range(0, reader.size - MiB, MiB))
    assert {t.name for t in threading.enumerate()} == threads


def _cached(reader: FileReader, start: int, length: int) -> bool:
    address = directread._Residency.map(reader.fileno(), reader.size)
    assert address is not None
    try:
        return directread._Residency.all_cached(address, start, length)
    finally:
        directread._Residency.unmap(address, reader.size)


def test_pieces_already_in_the_page_cache_are_copied_from_it(files):
    """A file just downloaded (written through the page cache) is not read from the disk again;
    pieces of a partly cached file each go the faster way."""
    readers, raws, paths = files
    _cache(paths[1])
    finished: list[tuple[int, str]] = []
    ranges, targets, expected = _ranges(readers, raws, finished)
    counts = read_ranges_direct(ranges)
    assert [bytes(t.numpy()) for t in targets] == expected
    second_file = sum(nbytes for file, _, nbytes in SPANS if file == 1)
    assert second_file <= counts.cached < second_file + 2 * 4096  # b.bin: cached; a.bin: by DMA
    assert counts.direct >= sum(nbytes for file, _, nbytes in SPANS if file == 0)


def test_a_failed_check_stops_the_readers(files):
    readers, raws, paths = files
    finished: list[tuple[int, str]] = []
    ranges, targets, _ = _ranges(readers, raws, finished, failing=1)
    before = _read_bytes()
    with pytest.raises(CorruptSnapshotError, match="damaged"):
        read_ranges_direct(ranges)
    assert [index for index, _ in finished] == [0, 1]
    # Range 1 ends near 9 MiB; beyond it at most the ring's worth was read (range 3 runs to 59 MiB)
    assert _read_bytes() - before <= 9 * MiB + directread.RING + directread.SLOT
    assert not targets[3].any() and not targets[4].any() and not targets[5].any()
    assert directread._POOL._free  # the ring went back to the pool


def test_a_file_shorter_than_its_ranges_is_found(files):
    readers, raws, paths = files
    finished: list[tuple[int, str]] = []
    target = torch.zeros(2 * MiB, dtype=torch.uint8)
    tail = ReadRange(readers[1], len(raws[1]) - MiB, byte_view(target), xxhash.xxh3_128(), lambda: finished.append(1))
    with pytest.raises(CorruptSnapshotError, match="truncated"):
        read_ranges_direct([tail])
    assert finished == []


def test_a_file_system_refusing_direct_reads_is_read_through_the_page_cache(files, monkeypatch):
    """It takes the O_DIRECT open but fails the read (EINVAL): the same pieces through the page cache."""
    readers, raws, paths = files
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(directread, "_read_direct", refuse)
    finished: list[tuple[int, str]] = []
    ranges, targets, expected = _ranges(readers, raws, finished)
    counts = read_ranges_direct(ranges)
    assert [bytes(t.numpy()) for t in targets] == expected
    assert [index for index, _ in finished] == list(range(len(SPANS)))
    assert counts.direct == 0 and counts.cached >= sum(len(raw) for raw in expected)
    assert len(calls) <= len(readers) * directread.READERS  # each file given up on at its first refusal


@pytest.mark.parametrize("why", ["direct I/O off", "a reader that is not a file"])
def test_without_direct_reads_the_page_cache_path_reads_the_same(files, monkeypatch, why):
    readers, raws, paths = files
    finished: list[tuple[int, str]] = []
    ranges, targets, expected = _ranges(readers, raws, finished)
    if why == "direct I/O off":
        monkeypatch.setenv("NBGUARD_DIRECT_IO", "0")
    else:
        ranges.append(ReadRange(BufferReader(b"xyz" * 1000), 5, byte_view(torch.zeros(100, dtype=torch.uint8)),
                                xxhash.xxh3_128(), lambda: finished.append((len(SPANS), ""))))
    counts = read_ranges_direct(ranges)
    assert [bytes(t.numpy()) for t in targets] == expected
    assert counts.direct == 0 and counts.cached == sum(len(r.into) for r in ranges)
    assert [index for index, _ in finished] == list(range(len(ranges)))
