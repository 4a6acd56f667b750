"""Reading blob files back: positional reads through the page cache straight into the memory that
holds the restored tensor, hashed as they arrive.

Reads go through the page cache (the kernel's read-ahead beat direct reads by 10-25 % in our
measurements) into the restored tensor's memory (a live tensor's own, or fresh), piece by piece on a
read-ahead thread while the previous piece is hashed, and each piece's cache pages are dropped once
copied. A hash-only pass (``hash_range``) leaves the pages in the cache for ``copy_cached``, which
copies them without reading the disk again (``RWF_NOWAIT``).
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CorruptSnapshotError
from .directio import _POOL, PIECE, SMALL, _drop_cache, _Helper, _Job, byte_view, open_regular, prefault
from .mapped import TRUNCATED, MapUnsupported, can_map, map_piece

_nowait_ok = hasattr(os, "preadv") and hasattr(os, "RWF_NOWAIT")  # cleared where the kernel refuses it


class FileReader:
    """Positional reads of one file; ``hasher`` sees every byte in order."""

    def __init__(self, path: str):
        self._file = open(open_regular(path), "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self._helper: _Helper | None = None
        self._can_map: bool | None = None
        self.opened = self.identity()  # before any byte is read: what a later check compares with
        self.size = self.opened[2]

    def close(self) -> None:
        if self._helper is not None:
            self._helper.stop()
            self._helper = None
        self._file.close()

    def __del__(self) -> None:
        if getattr(self, "_helper", None) is not None:
            self.close()

    def identity(self) -> tuple[int, ...]:
        """What changes when the file is replaced or written: device, inode, size, mtime and ctime (ns)."""
        st = os.fstat(self._file.fileno())
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the end of the file)."""
        out = bytearray(length)
        return bytes(out[:self._readinto(memoryview(out), offset)])

    def _readinto(self, view: memoryview, offset: int) -> int:
        done = 0
        if hasattr(os, "preadv"):  # positional: safe beside the read-ahead thread
            while done < len(view):
                n = os.preadv(self._file.fileno(), [view[done:]], offset + done)
                if not n:
                    break
                done += n
            return done
        self._file.seek(offset)
        while done < len(view):
            n = self._file.readinto(view[done:])
            if not n:
                break
            done += n
        return done

    def read_entry(self, offset: int, nbytes: int, hasher, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """The ``nbytes`` at ``offset`` in fresh memory of their own, fed to ``hasher`` as they arrive."""
        out = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes >= SMALL:
            prefault(out)
        self.read_into(byte_view(out), offset, hasher, progress)
        return out

    def read_into(self, view: memoryview, offset: int, hasher, progress: Callable[[int], None] | None = None) -> None:
        """Read ``len(view)`` bytes at ``offset`` into ``view`` (fresh memory or a live tensor's own),
        fed to ``hasher`` as they arrive.

        A read-ahead thread reads 16 MiB pieces straight into that memory while this thread hashes
        the piece before (the disk never waits for the hashing), and drops each piece's page-cache
        pages as soon as it has read it (``_read_dropping``), so the next pieces reuse them. (Direct reads were measured too: 10 %
        slower here, 25 % slower into fresh memory on the GPU machine, as the kernel's read-ahead is lost.)"""
        nbytes = len(view)
        spans = [(s, min(s + PIECE, nbytes)) for s in range(0, nbytes, PIECE)]
        if nbytes < SMALL:
            self._exact(view, offset)
            hasher.update(view)
            if progress:
                progress(nbytes)
            return
        if self._helper is None:
            self._helper = _Helper("nbguard-read")
        helper = self._helper
        jobs = [helper.submit(functools.partial(self._read_dropping, view[b:e], offset + b)) for b, e in spans]
        try:
            for (begin, end), job in zip(spans, jobs, strict=True):
                job.result()
                hasher.update(view[begin:end])
                if progress:
                    progress(end - begin)
        finally:
            for job in jobs:  # never leave a read in flight into memory that may be freed
                job.done.wait()

    def hash_range(self, offset: int, nbytes: int, hasher, progress: Callable[[int], None] | None = None) -> None:
        """Feed ``nbytes`` at ``offset`` to ``hasher``, leaving the pages in the page cache, so a restore
        that reads the same bytes next (into live tensors) reads them from memory. On a local disk the
        cached pages are hashed where they lie (``mapped``: no copy); elsewhere through two reused
        buffers."""
        if nbytes >= SMALL and self._maps():
            try:
                self._hash_mapped(offset, nbytes, hasher, progress)
                return
            except MapUnsupported:
                pass  # a kernel older than 5.14: nothing was hashed yet
        self._hash_buffered(offset, nbytes, hasher, progress)

    def _maps(self) -> bool:
        if self._can_map is None:
            self._can_map = can_map(self._file.fileno())
        return self._can_map

    def _hash_mapped(self, offset: int, nbytes: int, hasher, progress: Callable[[int], None] | None) -> None:
        """The read-ahead thread maps and reads in the next piece while this thread hashes one."""
        spans = [(s, min(s + PIECE, nbytes)) for s in range(0, nbytes, PIECE)]
        if self._helper is None:
            self._helper = _Helper("nbguard-read")
        helper, fd = self._helper, self._file.fileno()
        maps: dict[int, tuple[mmap.mmap, int]] = {}

        def load(index: int) -> None:
            begin, end = spans[index]
            maps[index] = map_piece(fd, offset + begin, end - begin)

        jobs = [helper.submit(functools.partial(load, 0))]
        try:
            for index, (begin, end) in enumerate(spans):
                try:
                    jobs[index].result()
                except MapUnsupported:
                    if not index:
                        raise
                    self._hash_buffered(offset + begin, nbytes - begin, hasher, progress)
                    return
                if index + 1 < len(spans):
                    jobs.append(helper.submit(functools.partial(load, index + 1)))
                mapped, at = maps.pop(index)
                with memoryview(mapped) as view:
                    hasher.update(view[at:at + end - begin])
                mapped.close()
                if progress:
                    progress(end - begin)
        finally:
            for job in jobs:
                job.done.wait()
            for mapped, _ in maps.values():
                mapped.close()

    def _hash_buffered(self, offset: int, nbytes: int, hasher, progress: Callable[[int], None] | None) -> None:
        """Through two reused buffers (no allocation): the read-ahead thread fills one while this
        thread hashes the other."""
        buffers = [_POOL.take(), _POOL.take()]
        views = [memoryview(b) for b in buffers]
        spans = [(s, min(s + PIECE, nbytes)) for s in range(0, nbytes, PIECE)]
        if self._helper is None and len(spans) > 1:
            self._helper = _Helper("nbguard-read")
        pending: list[_Job] = []

        def start(index: int) -> None:
            assert self._helper is not None  # started above whenever there are two pieces or more
            begin, end = spans[index]
            piece = views[index % 2][:end - begin]
            job = self._helper.submit(functools.partial(self._exact, piece, offset + begin))
            if len(pending) < 2:
                pending.append(job)
            else:
                pending[index % 2] = job

        try:
            if len(spans) == 1:
                piece = views[0][:nbytes]
                self._exact(piece, offset)
                hasher.update(piece)
                if progress:
                    progress(nbytes)
                return
            if spans:
                start(0)
            for index, (begin, end) in enumerate(spans):
                pending[index % 2].result()
                if index + 1 < len(spans):
                    start(index + 1)
                hasher.update(views[index % 2][:end - begin])
                if progress:
                    progress(end - begin)
        finally:
            for job in pending:
                if job is not None:
                    job.done.wait()
            for buffer in buffers:
                _POOL.give(buffer)

    def copy_cached(self, view: memoryview, offset: int, progress: Callable[[int], None] | None = None) -> bool:
        """Copy ``len(view)`` bytes at ``offset`` into ``view`` from the page cache alone: reads with
        ``RWF_NOWAIT`` never go to the disk, so after a hash pass (``hash_range``) through this open file
        every byte copied is one that was hashed. True if so; False if some bytes were not cached (or
        the platform lacks ``RWF_NOWAIT``): those were read from the disk, and the caller must hash ``view``.

        Two threads copy alternate 16 MiB pieces (one thread copies at about half the memory's
        speed). The pages are left in the cache, clean, for the kernel to reclaim when it needs them:
        dropping each piece once copied (``POSIX_FADV_DONTNEED``) made this copy 1.3-2x slower (a
        cold 0.75 GiB restore: 150-280 ms against 100-120 ms, the speed of a plain ``memcpy``), and
        nothing in a restore reads them again."""
        nbytes = len(view)
        spans = [(s, min(s + PIECE, nbytes)) for s in range(0, nbytes, PIECE)]
        missed: list[int] = []  # pieces read from the disk (list.append is atomic)

        def copy(index: int) -> None:
            begin, end = spans[index]
            if not self._nowait(view[begin:end], offset + begin):
                missed.append(index)
                self._exact(view[begin:end], offset + begin)

        if len(spans) < 2:
            for index in range(len(spans)):
                copy(index)
            if progress and nbytes:
                progress(nbytes)
            return not missed
        if self._helper is None:
            self._helper = _Helper("nbguard-read")
        def copy_even() -> None:
            for i in range(0, len(spans), 2):
                copy(i)

        job = self._helper.submit(copy_even)
        try:
            for index in range(1, len(spans), 2):
                copy(index)
                if progress:
                    progress(spans[index][1] - spans[index][0])
        finally:
            job.done.wait()  # never leave a read in flight into memory that may be freed
        job.result()
        if progress:
            progress(sum(end - begin for begin, end in spans[0::2]))
        return not missed

    def _nowait(self, view: memoryview, offset: int) -> bool:
        """Fill ``view`` from the page cache only; False as soon as a byte would need the disk."""
        global _nowait_ok
        done = 0
        while done < len(view) and _nowait_ok:
            try:
                n = os.preadv(self._file.fileno(), [view[done:]], offset + done, os.RWF_NOWAIT)
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                _nowait_ok = False  # this kernel or file system refuses it
                return False
            if not n:
                return False  # the end of the file: _exact says it is truncated
            done += n
        return done == len(view)

    def _exact(self, view: memoryview, offset: int) -> None:
        if self._readinto(view, offset) != len(view):
            raise CorruptSnapshotError(TRUNCATED)

    def _read_dropping(self, view: memoryview, offset: int) -> None:
        """``_exact``, then drop the piece's page-cache pages: the bytes are in ``view`` now, and
        hashing reads them there.

        The thread that reads drops, right after its read: dropping from the hashing thread, while
        the read-ahead thread reads the next piece of the same file, made a cold 3 GiB guarded restore
        1.47 s (0.89-2.38) against 0.93 s (0.87-1.04) this way, the cold read floor 0.85 s
        (6 rounds each, alternating, in one process, stop 39)."""
        self._exact(view, offset)
        _drop_cache(self._file.fileno(), offset, len(view))


@dataclass
class HashRange:
    """One range of a file to hash (``reader`` is a ``FileReader`` or any reader with ``hash_range``),
    and what to call once its last byte was fed to ``hasher``."""

    reader: Any
    offset: int
    nbytes: int
    hasher: Any
    finish: Callable[[], None]


def hash_ranges(ranges: Sequence[HashRange], progress: Callable[[int], None] | None = None) -> None:
    """``hash_range`` over several ranges in order (a restore's storages, across blob files), each
    ``finish`` called as soon as its range was hashed, with one read-ahead thread mapping and reading
    in the next piece across the ranges' boundaries. Hashing one range per call left the disk idle at
    every boundary while the last piece was hashed and the next range's first was asked for: a cold
    restore of 0.75 GiB (32 tensors) took 0.93x the time of the same restore hashing storage by
    storage (median of 10 rounds, paired in one process), 1.25x against 1.39x the cold-read floor in
    fresh processes (``python -m benchmarks.restore_ab``, medians of 7).

    Ranges that are not mapped (small ones, files on other file systems, other readers) are hashed
    by their reader's ``hash_range`` when their turn comes; the thread may be reading in the next
    mapped piece meanwhile."""
    mapped = [isinstance(r.reader, FileReader) and r.nbytes >= SMALL and r.reader._maps() for r in ranges]
    pieces = [(i, b, min(b + PIECE, r.nbytes)) for i, r in enumerate(ranges) if mapped[i]
              for b in range(0, r.nbytes, PIECE)]
    helper = _Helper("nbguard-read") if pieces else None
    maps: dict[int, tuple[mmap.mmap, int]] = {}
    jobs: list[_Job] = []

    def load(k: int) -> None:
        i, begin, end = pieces[k]
        maps[k] = map_piece(ranges[i].reader._file.fileno(), ranges[i].offset + begin, end - begin)

    def submit_next() -> None:
        if helper is not None and len(jobs) < len(pieces):
            jobs.append(helper.submit(functools.partial(load, len(jobs))))

    counts = [0] * len(ranges)
    for i, _, _ in pieces:
        counts[i] += 1
    start = 0  # the first piece of range i
    unsupported = False  # this kernel cannot populate maps: every later range through buffers
    try:
        submit_next()
        for i, r in enumerate(ranges):
            if not mapped[i]:
                r.reader.hash_range(r.offset, r.nbytes, r.hasher, progress)
            elif unsupported:
                r.reader._hash_buffered(r.offset, r.nbytes, r.hasher, progress)
            else:
                for k in range(start, start + counts[i]):
                    _, begin, end = pieces[k]
                    try:
                        jobs[k].result()
                    except MapUnsupported:  # nothing else in flight: a piece is asked for once the one before loaded
                        unsupported = True
                        r.reader._hash_buffered(r.offset + begin, r.nbytes - begin, r.hasher, progress)
                        break
                    submit_next()
                    piece, at = maps.pop(k)
                    with memoryview(piece) as view:
                        r.hasher.update(view[at:at + end - begin])
                    piece.close()
                    if progress:
                        progress(end - begin)
            start += counts[i]
            r.finish()
    finally:
        for job in jobs:
            job.done.wait()
        for piece, _ in maps.values():
            piece.close()
        if helper is not None:
            helper.stop()


# Reads of a restore into memory of its own come in pieces this large: 64 MiB requests let the
# kernel read ahead far enough that the disk never waits (0.75 GiB into warm memory, hashed on the
# calling thread while the next piece is read: 0.87x the single-threaded cold-read floor against
# 1.15x with 16 MiB pieces, medians of 6 rounds).
READ_PIECE = 64 * 2**20
# Pieces asked for and not yet hashed: while this thread hashes one, the helper reads the next, and
# the one after is asked for long before that read ends (a 64 MiB piece hashes in ~15 ms and reads
# in ~40-60 ms here), so the disk never waits; a failed check waits for at most these.
READ_AHEAD = 2


@dataclass
class ReadRange:
    """One range of a blob to read into ``into`` (memory of exactly its size), what it is hashed
    with, and what to call once its last byte landed and was hashed."""

    reader: Any
    offset: int
    into: memoryview
    hasher: Any
    finish: Callable[[], None]


def read_ranges(ranges: Sequence[ReadRange], progress: Callable[[int], None] | None = None) -> None:
    """Read ranges, in the order given (a restore sorts them as they lie on the disk), into their
    memory, each piece hashed once it landed there (what is checked is what landed): a read-ahead
    thread reads the next 64 MiB pieces, across ranges, while this one hashes the last, and drops
    each piece's page-cache pages once it has read it (``FileReader._read_dropping``). Ranges of other readers (a blob held in memory) are
    read by their ``read_into`` when their turn comes.

    At most ``READ_AHEAD`` pieces are asked for and not yet hashed, so a range that fails its check
    (a ``finish`` raising) stops the read within that many pieces: the caller can go on to an older
    snapshot without waiting for the rest of this one to be read."""
    pieces = [(i, b, min(b + READ_PIECE, len(r.into))) for i, r in enumerate(ranges) if isinstance(r.reader, FileReader)
              for b in range(0, len(r.into), READ_PIECE)]
    helper = _Helper("nbguard-read") if pieces else None
    jobs: list[_Job] = []

    def submit_next() -> None:
        if helper is not None and len(jobs) < len(pieces):
            i, begin, end = pieces[len(jobs)]
            r = ranges[i]
            jobs.append(helper.submit(functools.partial(r.reader._read_dropping, r.into[begin:end], r.offset + begin)))

    k = 0
    try:
        for _ in range(READ_AHEAD):
            submit_next()
        for i, r in enumerate(ranges):
            if not isinstance(r.reader, FileReader):
                r.reader.read_into(r.into, r.offset, r.hasher, progress)
            while k < len(pieces) and pieces[k][0] == i:
                _, begin, end = pieces[k]
                jobs[k].result()
                r.hasher.update(r.into[begin:end])
                submit_next()
                if progress:
                    progress(end - begin)
                k += 1
            r.finish()
    finally:
        for job in jobs:  # never leave a read in flight into memory that may be reused
            job.done.wait()
        if helper is not None:
            helper.stop()
