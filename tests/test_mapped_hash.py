"""The restore's hash pass reads blob bytes where they lie in the page cache (``stores/mapped.py``):
the same digests as reading them, never a SIGBUS on a file that shrank, the buffered way on file
systems that are not local disks and on kernels without MADV_POPULATE_READ."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import xxhash

from nbguard.errors import CorruptSnapshotError
from nbguard.format.blobfile import BufferReader
from nbguard.stores import filereader, mapped
from nbguard.stores.directio import byte_view
from nbguard.stores.filereader import FileReader, HashRange, ReadRange, hash_ranges, read_ranges

MiB = 2**20
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page-cache maps")


def _file(tmp_path, nbytes: int) -> tuple[str, bytes]:
    data = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    raw = data.numpy().tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(raw)
    return str(path), raw


def _digest(reader: FileReader, offset: int, nbytes: int) -> str:
    hasher = xxhash.xxh3_128()
    seen: list[int] = []
    reader.hash_range(offset, nbytes, hasher, seen.append)
    assert sum(seen) == nbytes
    return hasher.hexdigest()


def test_this_machine_maps_blob_files(tmp_path):
    """The test folder is on a local disk file system, so the tests below exercise the mapped path."""
    path, _ = _file(tmp_path, 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert mapped.file_system_type(fd) in mapped.LOCAL_FILE_SYSTEMS
        assert mapped.can_map(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("offset, nbytes", [(0, 40 * MiB + 123), (4097, 33 * MiB), (3 * MiB + 1, MiB)])
def test_mapped_hash_equals_the_hash_of_the_bytes(tmp_path, offset, nbytes):
    """Offsets off the page grid, several 16 MiB pieces, a partial last piece."""
    path, raw = _file(tmp_path, 48 * MiB)
    reader = FileReader(path)
    try:
        assert reader._maps()
        assert _digest(reader, offset, nbytes) == xxhash.xxh3_128(raw[offset:offset + nbytes]).hexdigest()
    finally:
        reader.close()


def test_a_blob_that_shrank_since_it_was_opened_is_reported_not_a_crash(tmp_path):
    """Truncated by another process after the open: CorruptSnapshotError, the process lives on."""
    path, _ = _file(tmp_path, 40 * MiB)
    reader = FileReader(path)
    try:
        os.truncate(path, 20 * MiB)
        with pytest.raises(CorruptSnapshotError, match="truncated"):
            _digest(reader, 0, 40 * MiB)
    finally:
        reader.close()


def test_populating_a_map_past_the_end_of_the_file_fails_instead_of_sigbus(tmp_path):
    """The kernel fact the mapped path stands on: MADV_POPULATE_READ over pages a truncation took
    away returns EFAULT, where touching them would raise SIGBUS. In a child process, so a SIGBUS
    could not take the test run with it."""
    path, _ = _file(tmp_path, 8 * MiB)
    child = textwrap.dedent(f"""
        import mmap, os
        from nbguard.errors import CorruptSnapshotError
        from nbguard.stores import mapped
        fd = os.open({path!r}, os.O_RDONLY)
        m = mmap.mmap(fd, 8 << 20, prot=mmap.PROT_READ)
        os.truncate({path!r}, 1 << 20)
        try:
            m.madvise(mapped.MADV_POPULATE_READ)
        except OSError as exc:
            print("errno", exc.errno)
        real_mmap = mmap.mmap
        mmap.mmap = lambda *a, **k: m  # map_piece meets the same shrunken map
        try:
            mapped.map_piece(fd, 0, 8 << 20)
        except CorruptSnapshotError as exc:
            print("refused:", exc)
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr
    assert "errno 14" in done.stdout  # EFAULT
    assert "refused: blob is truncated" in done.stdout


def test_other_file_systems_are_hashed_through_buffers(tmp_path, monkeypatch):
    """A FUSE or network mount (Colab's Drive folder) can fail any read: never mapped."""
    path, raw = _file(tmp_path, 20 * MiB)
    monkeypatch.setattr(mapped, "file_system_type", lambda fd: 0x65735546)  # FUSE_SUPER_MAGIC
    monkeypatch.setattr(mapped, "map_piece", None)  # would raise if it were called
    reader = FileReader(path)
    try:
        assert not reader._maps()
        assert _digest(reader, 0, len(raw)) == xxhash.xxh3_128(raw).hexdigest()
    finally:
        reader.close()


def test_a_kernel_without_populate_read_falls_back_to_buffers(tmp_path, monkeypatch):
    """An advice the kernel does not know fails with EINVAL, as MADV_POPULATE_READ does before
    Linux 5.14: the whole range is hashed through buffers, and later files skip the maps."""
    path, raw = _file(tmp_path, 20 * MiB)
    monkeypatch.setattr(mapped, "MADV_POPULATE_READ", 0x7FFF)
    monkeypatch.setattr(mapped, "_enabled", True)
    reader = FileReader(path)
    try:
        assert _digest(reader, 0, len(raw)) == xxhash.xxh3_128(raw).hexdigest()
        assert mapped._enabled is False
        assert not mapped.can_map(reader._file.fileno())
    finally:
        reader.close()


def _ranges(tmp_path):
    """Ranges over two files and a reader that is not a file: large ones (mapped, several pieces),
    small ones (read), in an order that crosses files both ways."""
    first, raw1 = _file(tmp_path, 40 * MiB)
    second_path = tmp_path / "second.bin"
    raw2 = bytes(reversed(raw1[:24 * MiB]))
    second_path.write_bytes(raw2)
    readers = [FileReader(first), FileReader(str(second_path)), BufferReader(raw2)]
    spans = [(0, 0, 17 * MiB), (1, 4097, 20 * MiB), (0, 17 * MiB, 1000), (2, 5, 3 * MiB),
             (0, 17 * MiB + 1000, 23 * MiB - 1000), (1, 100, 2 * MiB)]
    sources = [raw1, raw2, raw2]
    return readers, [(readers[r], offset, nbytes, sources[r][offset:offset + nbytes]) for r, offset, nbytes in spans]


def _failing_at(failing: int, finished: list[int]):
    """A ``finish`` that records each range and finds range ``failing`` damaged."""
    def finish(index: int) -> None:
        finished.append(index)
        if index == failing:
            raise CorruptSnapshotError("blob entry 'x' is damaged (hash mismatch)")
    return finish


def test_hash_ranges_hashes_each_range_in_order_across_files(tmp_path):
    """One read-ahead thread across the ranges of a restore: each digest is its range's, each
    ``finish`` runs once, in order, right after its range; every byte is reported once."""
    readers, spans = _ranges(tmp_path)
    finished: list[tuple[int, str]] = []
    ranges = []
    for index, (reader, offset, nbytes, _) in enumerate(spans):
        hasher = xxhash.xxh3_128()
        ranges.append(HashRange(reader, offset, nbytes, hasher,
                                lambda index=index, hasher=hasher: finished.append((index, hasher.hexdigest()))))
    seen: list[int] = []
    threads = {t.name for t in threading.enumerate()}
    hash_ranges(ranges, seen.append)
    assert finished == [(i, xxhash.xxh3_128(raw).hexdigest()) for i, (*_, raw) in enumerate(spans)]
    assert sum(seen) == sum(nbytes for _, _, nbytes, _ in spans)
    assert {t.name for t in threading.enumerate()} == threads  # its thread is gone
    for reader in readers:
        reader.close()


def test_hash_ranges_stops_at_the_first_range_that_fails_its_check(tmp_path):
    """A ``finish`` that raises (a damaged entry) ends the pass there: no later range is hashed or
    finished, and no read is left in flight."""
    readers, spans = _ranges(tmp_path)
    finished: list[int] = []
    finish = _failing_at(1, finished)

    ranges = [HashRange(reader, offset, nbytes, xxhash.xxh3_128(), lambda index=index: finish(index))
              for index, (reader, offset, nbytes, _) in enumerate(spans)]
    with pytest.raises(CorruptSnapshotError, match="damaged"):
        hash_ranges(ranges)
    assert finished == [0, 1]
    for reader in readers:
        reader.close()


def test_hash_ranges_on_a_kernel_without_populate_read_hashes_through_buffers(tmp_path, monkeypatch):
    """MADV_POPULATE_READ refused at the first map: that range and every later one are hashed
    through buffers, with the same digests."""
    monkeypatch.setattr(mapped, "MADV_POPULATE_READ", 0x7FFF)
    monkeypatch.setattr(mapped, "_enabled", True)
    readers, spans = _ranges(tmp_path)
    hashers = [xxhash.xxh3_128() for _ in spans]
    hash_ranges([HashRange(reader, offset, nbytes, hasher, lambda: None)
                 for (reader, offset, nbytes, _), hasher in zip(spans, hashers, strict=True)])
    assert [h.hexdigest() for h in hashers] == [xxhash.xxh3_128(raw).hexdigest() for *_, raw in spans]
    assert mapped._enabled is False
    for reader in readers:
        reader.close()


def test_read_ranges_lands_every_byte_and_hashes_what_landed(tmp_path, monkeypatch):
    """A restore into staging memory: each range's bytes land in its own memory, read ahead in
    pieces across ranges and files (pieces of 4 MiB here, so ranges span several), each hashed once
    landed; ``finish`` once per range, in order; every byte reported once; no thread left behind."""
    monkeypatch.setattr(filereader, "READ_PIECE", 4 * MiB)
    readers, spans = _ranges(tmp_path)
    targets = [torch.zeros(nbytes, dtype=torch.uint8) for _, _, nbytes, _ in spans]
    finished: list[tuple[int, str]] = []
    ranges = []
    for index, ((reader, offset, _, _), target) in enumerate(zip(spans, targets, strict=True)):
        hasher = xxhash.xxh3_128()
        ranges.append(ReadRange(reader, offset, byte_view(target), hasher,
                                lambda index=index, hasher=hasher: finished.append((index, hasher.hexdigest()))))
    seen: list[int] = []
    threads = {t.name for t in threading.enumerate()}
    read_ranges(ranges, seen.append)
    assert [bytes(t.numpy()) for t in targets] == [raw for *_, raw in spans]
    assert finished == [(i, xxhash.xxh3_128(raw).hexdigest()) for i, (*_, raw) in enumerate(spans)]
    assert sum(seen) == sum(nbytes for _, _, nbytes, _ in spans)
    assert {t.name for t in threading.enumerate()} == threads
    for reader in readers:
        reader.close()


def test_the_read_ahead_thread_drops_each_piece_from_the_page_cache_right_after_reading_it(tmp_path, monkeypatch):
    """Reads into memory (a guarded restore's staging, fresh memory) leave no page cache behind,
    and the thread that read a piece drops it: dropping from the hashing thread while the other
    reads the same file made a cold 3 GiB restore ~1.6x slower (``FileReader._read_dropping``)."""
    monkeypatch.setattr(filereader, "READ_PIECE", 4 * MiB)
    dropped: list[tuple[str, int, int, int]] = []
    real_drop = filereader._drop_cache

    def recording_drop(fd: int, offset: int, length: int) -> None:
        dropped.append((threading.current_thread().name, os.fstat(fd).st_ino, offset, length))
        real_drop(fd, offset, length)

    monkeypatch.setattr(filereader, "_drop_cache", recording_drop)
    readers, spans = _ranges(tmp_path)
    file_spans = [(reader, offset, nbytes) for reader, offset, nbytes, _ in spans if isinstance(reader, FileReader)]
    targets = [torch.zeros(nbytes, dtype=torch.uint8) for _, _, nbytes, _ in spans]
    read_ranges([ReadRange(reader, offset, byte_view(target), xxhash.xxh3_128(), lambda: None)
                 for (reader, offset, _, _), target in zip(spans, targets, strict=True)])
    assert {name for name, *_ in dropped} == {"nbguard-read"}
    covered = sorted((ino, offset, length) for _, ino, offset, length in dropped)
    expected = sorted((reader.opened[1], offset + begin, min(4 * MiB, nbytes - begin))
                      for reader, offset, nbytes in file_spans for begin in range(0, nbytes, 4 * MiB))
    assert covered == expected

    dropped.clear()
    reader = readers[0]
    into = torch.zeros(40 * MiB, dtype=torch.uint8)
    reader.read_into(byte_view(into), 0, xxhash.xxh3_128())  # FileReader.read_into: 16 MiB pieces
    assert [(name, offset, length) for name, _, offset, length in dropped] == [
        ("nbguard-read", 0, 16 * MiB), ("nbguard-read", 16 * MiB, 16 * MiB), ("nbguard-read", 32 * MiB, 8 * MiB)]
    for reader in readers:
        reader.close()


def test_read_ranges_stops_at_the_first_range_that_fails_its_check(tmp_path, monkeypatch):
    monkeypatch.setattr(filereader, "READ_PIECE", 4 * MiB)
    readers, spans = _ranges(tmp_path)
    finished: list[int] = []
    finish = _failing_at(1, finished)

    targets = [torch.zeros(nbytes, dtype=torch.uint8) for _, _, nbytes, _ in spans]  # alive while reads may land
    ranges = [ReadRange(reader, offset, byte_view(target), xxhash.xxh3_128(), lambda index=index: finish(index))
              for index, ((reader, offset, _, _), target) in enumerate(zip(spans, targets, strict=True))]
    with pytest.raises(CorruptSnapshotError, match="damaged"):
        read_ranges(ranges)
    assert finished == [0, 1]
    # Range 1 ends with piece 9 (4 MiB pieces); at most READ_AHEAD = 2 more were asked for (range 2's
    # and range 4's first), so the rest of range 4 and range 5 were never read
    assert filereader.READ_AHEAD == 2
    assert targets[4][:4 * MiB].any() and not targets[4][4 * MiB:].any() and not targets[5].any()
    for reader in readers:
        reader.close()
