"""Reading a restore's storages around the page cache: ``O_DIRECT`` reads into a ring of aligned
bounce slots, copied from there into the storages' memory and hashed while that memory is in the
CPU cache.

Why: a cold restore through the page cache (``filereader.read_ranges``) pays, besides the disk, a
page-cache page for every 4 KiB it reads, the kernel's copy out of it and the drop behind; on these
VMs a page-cache page often has to come back from the host first. Reading the same 0.75 GiB by DMA
into a 32 MiB ring, three reads in flight, and copying + hashing on the calling thread took 0.78-0.87x
the time of the page-cache path (medians of 10 rounds paired in one process, ``Guard.restore`` into a
prepared guard; Intel Xeon VM, 2 cores), and 1.02-1.09x a plain single-stream read of the same files.

How:

* the ranges, sorted as their bytes lie on the disk, are cut into pieces of at most ``SLOT`` bytes of
  file, aligned to ``BLOCK`` at both ends (a piece may hold the end of one range, a small gap and the
  start of the next);
* ``READERS`` threads read pieces into free slots of the ring (several requests in flight: a virtual
  disk serves them side by side); a piece whose pages are all in the page cache already (``mincore``)
  is copied from there instead of read from the disk again;
* the calling thread takes the pieces in order, copies each part into its range's memory
  ``COPY`` bytes at a time and hashes them right after they landed (what is checked is what
  landed), calls each range's ``finish`` once its last byte was hashed, and gives the slot back.
  Only this thread writes the destination memory; a failed check stops the readers.

Where direct reads cannot be used (not Linux, ``NBGUARD_DIRECT_IO=0``, a reader that is not a file,
a file system refusing ``O_DIRECT``) the ranges are read through the page cache
(``filereader.read_ranges``); a file system that takes ``O_DIRECT`` opens but refuses our reads has
its remaining pieces read through the page cache, into the same slots.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import CorruptSnapshotError
from . import directio
from .directio import _POOL, BLOCK, PIECE, _drop_cache, round_up
from .filereader import FileReader, ReadRange, read_ranges
from .mapped import TRUNCATED

SLOT = 4 * 2**20  # bytes of file per read: the ring holds RING // SLOT of them
RING = 2 * PIECE  # two of the bounce buffers saves use (32 MiB): a restore's peak memory beyond the state
READERS = 3  # reads in flight at once
COPY = 2**20  # copied into a storage and hashed at a time: stays in the CPU cache in between


@dataclass
class ReadCounts:
    """Bytes of file a ``read_ranges`` call read by DMA and copied out of the page cache (pieces
    already cached), or read through the page cache because direct reads could not be used."""

    direct: int = 0
    cached: int = 0


@dataclass
class _Piece:
    """``length`` bytes of one file from ``start`` (both BLOCK-aligned), and the parts of it that go
    into ranges: (range index, offset in the range, offset in the piece, bytes)."""

    file: _File
    start: int
    end: int = 0  # the last byte that some range needs, plus one
    parts: list[tuple[int, int, int, int]] = field(default_factory=list)


class _File:
    """One blob file as the readers see it: its reader's descriptor (page cache), one opened with
    O_DIRECT (None once direct reads failed), and a map of it used only to ask which pages are
    cached."""

    def __init__(self, reader: FileReader, direct_fd: int):
        self.fd = reader.fileno()
        self.direct_fd: int | None = direct_fd
        self.size = os.fstat(self.fd).st_size
        self._map = _Residency.map(self.fd, self.size)

    def cached(self, start: int, length: int) -> bool:
        """Whether every page of [start, start + length) is in the page cache (False when unknown)."""
        return self._map is not None and _Residency.all_cached(self._map, start, min(length, self.size - start))

    def close(self) -> None:
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None
        if self._map is not None:
            _Residency.unmap(self._map, self.size)
            self._map = None


_LOW_BIT = bytes(b & 1 for b in range(256))


class _Residency:
    """``mincore`` over a read-only map of a file that is never touched (no page is read in by it)."""

    _libc: ctypes.CDLL | None = None
    PROT_READ, MAP_SHARED = 1, 1

    @classmethod
    def _lib(cls) -> ctypes.CDLL | None:
        if cls._libc is None and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.mmap.restype = ctypes.c_void_p
                libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                      ctypes.c_long]
                libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
                libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
                cls._libc = libc
            except (OSError, AttributeError):
                return None
        return cls._libc

    @classmethod
    def map(cls, fd: int, size: int) -> int | None:
        libc = cls._lib()
        if libc is None or not size:
            return None
        address = libc.mmap(None, size, cls.PROT_READ, cls.MAP_SHARED, fd, 0)
        return None if address in (None, ctypes.c_void_p(-1).value) else address

    @classmethod
    def all_cached(cls, address: int, start: int, length: int) -> bool:
        libc = cls._lib()
        if libc is None or length <= 0:
            return False
        page = os.sysconf("SC_PAGE_SIZE")
        first = start - start % page
        pages = -(-(start + length - first) // page)
        vector = ctypes.create_string_buffer(pages)
        if libc.mincore(address + first, pages * page, vector):
            return False
        return b"\0" not in vector.raw.translate(_LOW_BIT)  # bit 0: resident; the others are reserved

    @classmethod
    def unmap(cls, address: int, size: int) -> None:
        libc = cls._lib()
        if libc is not None:
            libc.munmap(address, size)


def usable(ranges: Sequence[ReadRange]) -> bool:
    """Whether ``read_ranges`` reads these ranges directly: Linux with direct I/O on, every range a file's."""
    return (directio.enabled() and os.path.isdir("/proc/self/fd")
            and all(isinstance(r.reader, FileReader) for r in ranges))


def read_ranges_direct(ranges: Sequence[ReadRange], progress: Callable[[int], None] | None = None) -> ReadCounts:
    """``filereader.read_ranges`` (same contract: every range's bytes land in its memory, hashed as
    they landed, ``finish`` called per range in order, stopping at the first that raises) with the
    bytes read around the page cache where the file system allows; see the module's docstring."""
    counts = ReadCounts()
    if not ranges:
        return counts
    files = _open_files(ranges) if usable(ranges) else None
    if files is None:
        read_ranges(ranges, progress)
        counts.cached = sum(len(r.into) for r in ranges)
        return counts
    try:
        _Pipeline(ranges, files, _pieces(ranges, files), counts).run(progress)
    finally:
        for file in set(files.values()):
            file.close()
    return counts


def _open_files(ranges: Sequence[ReadRange]) -> dict[int, _File] | None:
    """One ``_File`` per reader, or None (every one closed) where a file refuses an O_DIRECT open."""
    files: dict[int, _File] = {}
    for r in ranges:
        if id(r.reader) in files:
            continue
        try:
            # the same open file (even if its path was replaced since), with a description of its own
            direct_fd = os.open(f"/proc/self/fd/{r.reader.fileno()}", os.O_RDONLY | directio._O_DIRECT)
        except OSError:
            for file in files.values():
                file.close()
            return None
        files[id(r.reader)] = _File(r.reader, direct_fd)
    return files


def _pieces(ranges: Sequence[ReadRange], files: dict[int, _File]) -> list[_Piece]:
    pieces: list[_Piece] = []
    for index, r in enumerate(ranges):
        file, done, nbytes = files[id(r.reader)], 0, len(r.into)
        while done < nbytes:
            at = r.offset + done
            last = pieces[-1] if pieces else None
            if last is None or last.file is not file or not last.start <= at < last.start + SLOT:
                last = _Piece(file, at - at % BLOCK)
                pieces.append(last)
            take = min(nbytes - done, last.start + SLOT - at)
            last.parts.append((index, done, at - last.start, take))
            last.end = max(last.end, at + take)
            done += take
    return pieces


class _Pipeline:
    """The ring, its reader threads, and the calling thread's copy-and-hash loop."""

    def __init__(self, ranges: Sequence[ReadRange], files: dict[int, _File], pieces: list[_Piece], counts: ReadCounts):
        self.ranges, self.pieces, self.counts = ranges, pieces, counts
        self.files = files
        self.lock = threading.Condition()
        self.next_piece = 0
        self.finished = 0  # ranges whose finish was called, from the first
        self.stopped = False
        self.landed: dict[int, tuple[int, int] | BaseException] = {}  # piece -> (slot, bytes read) or error

    def run(self, progress: Callable[[int], None] | None) -> None:
        buffers = [_POOL.take() for _ in range(RING // PIECE)]
        per_buffer = PIECE // SLOT
        views = [memoryview(buffer) for buffer in buffers]
        holders = [ctypes.c_char.from_buffer(buffer) for buffer in buffers]
        self.slots = [views[s // per_buffer][(s % per_buffer) * SLOT:(s % per_buffer + 1) * SLOT]
                      for s in range(len(buffers) * per_buffer)]
        self.free = list(range(len(self.slots)))
        threads = [threading.Thread(target=self._read_pieces, name="nbguard-read", daemon=True)
                   for _ in range(min(READERS, len(self.pieces)))]
        for thread in threads:
            thread.start()
        try:
            self._land_all([ctypes.addressof(h) for h in holders], per_buffer, progress)
        finally:
            with self.lock:
                self.stopped = True
                self.lock.notify_all()
            for thread in threads:  # a read in flight writes a slot: the ring is given back after it
                thread.join()
            del holders, views
            self.slots.clear()
            for buffer in buffers:
                _POOL.give(buffer)

    def _land_all(self, bases: list[int], per_buffer: int, progress: Callable[[int], None] | None) -> None:
        for number, piece in enumerate(self.pieces):
            with self.lock:
                while number not in self.landed:
                    self.lock.wait()
                landed = self.landed.pop(number)
            if isinstance(landed, BaseException):
                raise landed
            slot, got = landed
            if got < piece.end - piece.start:
                raise CorruptSnapshotError(TRUNCATED)
            slot_address = bases[slot // per_buffer] + (slot % per_buffer) * SLOT
            for index, into_at, piece_at, nbytes in piece.parts:
                r = self.ranges[index]
                into_address = ctypes.addressof(ctypes.c_char.from_buffer(r.into))
                for step in range(0, nbytes, COPY):
                    size = min(COPY, nbytes - step)
                    ctypes.memmove(into_address + into_at + step, slot_address + piece_at + step, size)
                    r.hasher.update(r.into[into_at + step:into_at + step + size])
                if progress:
                    progress(nbytes)
                if into_at + nbytes == len(r.into):
                    self._finish_through(index + 1)
            with self.lock:
                self.free.append(slot)
                self.lock.notify_all()
        self._finish_through(len(self.ranges))

    def _finish_through(self, end: int) -> None:
        """Call ``finish`` of the ranges not finished yet before ``end``: every byte of theirs was
        hashed (empty ones have none)."""
        while self.finished < end:
            self.finished += 1
            self.ranges[self.finished - 1].finish()

    def _read_pieces(self) -> None:
        while True:
            with self.lock:
                while not self.free and not self.stopped:
                    self.lock.wait()
                if self.stopped or self.next_piece >= len(self.pieces):
                    return
                number, slot = self.next_piece, self.free.pop()
                self.next_piece += 1
            piece = self.pieces[number]
            try:
                result: tuple[int, int] | BaseException = (slot, self._read(piece, self.slots[slot]))
            except BaseException as exc:  # handed to the calling thread at this piece
                result = exc
            with self.lock:
                self.landed[number] = result
                self.lock.notify_all()

    def _read(self, piece: _Piece, slot: memoryview) -> int:
        """Read the piece into ``slot``; the bytes from its start that landed (short only at the end
        of the file)."""
        file, wanted = piece.file, piece.end - piece.start
        if file.direct_fd is not None and not file.cached(piece.start, wanted):
            try:
                got = _read_direct(file.direct_fd, slot[:round_up(wanted)], piece.start, wanted)
                with self.lock:
                    self.counts.direct += wanted
                return got
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                with self.lock:  # takes O_DIRECT opens but not these reads: the page cache from now on
                    fd, file.direct_fd = file.direct_fd, None
                if fd is not None:
                    os.close(fd)
        got = _read_buffered(file.fd, slot[:wanted], piece.start)
        _drop_cache(file.fd, piece.start, wanted)
        with self.lock:
            self.counts.cached += wanted
        return got


def _read_direct(fd: int, view: memoryview, offset: int, wanted: int) -> int:
    got = 0
    while got < wanted:
        n = os.preadv(fd, [view[got:]], offset + got)
        got += n
        if n <= 0 or got % BLOCK:  # the end of the file (direct reads are short only there)
            break
    return got


def _read_buffered(fd: int, view: memoryview, offset: int) -> int:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            break
        got += n
    return got
