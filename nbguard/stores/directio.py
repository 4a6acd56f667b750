"""Writing blob files around the page cache (``O_DIRECT``, ordinary I/O as fallback); the bounce buffers,
helper threads and prefaulting that reads (``filereader``) share.

Why: a snapshot is written once and read back rarely, yet every byte written through the page cache
takes a fresh page of RAM, copies into it, and on these VMs (Colab's too) that page often has to come
back from the host first. Measured here for 3 GiB: the write itself is no faster, but the page-cache
path costs the training loop ~0.5 s of CPU and memory traffic per save and grows the cache by the
snapshot's size. ``O_DIRECT`` moves the bytes by DMA between the disk and user memory instead.

Writes go through two page-aligned bounce buffers: the caller hashes a piece of the snapshot while
it is in the CPU cache and copies it into one buffer while a helper thread writes the other, so the
disk never waits for the hashing.

Where a file system refuses ``O_DIRECT`` (tmpfs on older kernels, FUSE mounts, macOS, Windows) the
same calls use ordinary I/O. ``NBGUARD_DIRECT_IO=0`` turns direct I/O off.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import queue
import stat
import sys
import threading
from collections.abc import Callable

import torch

BLOCK = 4096  # alignment of offsets, lengths and addresses for O_DIRECT (covers 512 B and 4 KiB sectors)
PIECE = 16 * 2**20  # bounce buffer size, and the size of each read: large for the disk, small for the CPU cache
SMALL = 2**20  # entries below this are read through the page cache in one call

_O_DIRECT = getattr(os, "O_DIRECT", 0)


def enabled() -> bool:
    """Whether direct I/O is tried at all (Linux, and not switched off by NBGUARD_DIRECT_IO=0)."""
    return bool(_O_DIRECT) and os.environ.get("NBGUARD_DIRECT_IO", "1") != "0"


def round_up(n: int, to: int = BLOCK) -> int:
    return -(-n // to) * to


def open_direct(path: str, flags: int, mode: int = 0o644) -> int | None:
    """A file descriptor opened with O_DIRECT, or None where the file system refuses it."""
    if not enabled():
        return None
    try:
        return os.open(path, flags | _O_DIRECT, mode)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise


def _drop_direct(fd: int) -> None:
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)


class _BouncePool:
    """Page-aligned buffers kept for the life of the process (fresh memory is slow to touch)."""

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, PIECE)

    def give(self, buffer: mmap.mmap) -> None:
        with self._lock:
            self._free.append(buffer)


_POOL = _BouncePool()


class _Job:
    def __init__(self, fn: Callable[[], None]):
        self.fn = fn
        self.done = threading.Event()
        self.error: BaseException | None = None

    def result(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error


class _Helper:
    """One thread running jobs in order. (concurrent.futures refuses new work once the interpreter
    is exiting, which is exactly when nbguard flushes the last save.)"""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> _Job:
        job = _Job(fn)
        self._jobs.put(job)
        return job

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job.fn()
            except BaseException as exc:  # handed to the submitter by result()
                job.error = exc
            job.done.set()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()


class SequentialWriter:
    """Writes a file front to back from pieces of any size, starting at ``start`` (a multiple of
    BLOCK); ``pwrite_block`` writes the reserved front afterwards. ``on_write`` is called before
    every piece is taken (the crash tests kill the process there)."""

    def __init__(self, fd: int, *, direct: bool, start: int, on_write: Callable[[], None] | None = None):
        self.fd = fd
        self.direct = direct
        self.offset = start
        self.on_write = on_write
        self._io: _Helper | None = None  # started when a file needs more than one bounce buffer
        if direct:
            self._buffers = [_POOL.take(), _POOL.take()]
            self._pending: list[_Job | None] = [None, None]
            self._current = 0
            self._fill = 0

    def write(self, piece: memoryview) -> None:
        """Append ``piece`` (copied before this returns: the caller may reuse it)."""
        if self.on_write is not None:
            self.on_write()
        if not self.direct:
            self._pwrite_all(piece, self.offset)
            self.offset += len(piece)
            return
        while len(piece):
            buffer = self._buffers[self._current]
            take = min(len(piece), PIECE - self._fill)
            buffer[self._fill:self._fill + take] = piece[:take]
            self._fill += take
            piece = piece[take:]
            if self._fill == PIECE:
                self._submit()

    def _submit(self, *, last: bool = False) -> None:
        index, length = self._current, self._fill
        view, offset = memoryview(self._buffers[index])[:round_up(length)], self.offset
        if last and self._io is None:
            self._pwrite_direct(view, offset)  # a small file: no helper thread
        else:
            if self._io is None:
                self._io = _Helper("nbguard-io")
            self._pending[index] = self._io.submit(lambda: self._pwrite_direct(view, offset))
        self.offset += length
        self._current, self._fill = 1 - index, 0
        waiting = self._pending[self._current]
        if waiting is not None:
            waiting.result()  # the other buffer's write must be done before it is refilled
            self._pending[self._current] = None

    def _pwrite_direct(self, view: memoryview, offset: int) -> None:
        try:
            self._pwrite_all(view, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _drop_direct(self.fd)  # this file system takes O_DIRECT opens but not our alignment
            self._pwrite_all(view, offset)

    def _pwrite_all(self, view: memoryview, offset: int) -> None:
        view = view.cast("B") if view.format != "B" else view
        if not hasattr(os, "pwrite"):  # Windows
            os.lseek(self.fd, offset, os.SEEK_SET)
        while len(view):
            written = os.pwrite(self.fd, view, offset) if hasattr(os, "pwrite") else os.write(self.fd, view)
            view, offset = view[written:], offset + written

    def finish(self) -> int:
        """Write what is buffered; the file's data ends at the returned offset (it is truncated there)."""
        if self.direct:
            try:
                end = self.offset + self._fill
                if self._fill:
                    buffer = self._buffers[self._current]
                    padded = round_up(self._fill)
                    buffer[self._fill:padded] = bytes(padded - self._fill)
                    self._submit(last=True)
                for future in self._pending:
                    if future is not None:
                        future.result()
                os.ftruncate(self.fd, end)  # the last block was written padded
                self.offset = end
            finally:
                self.close()
        return self.offset

    def pwrite_block(self, data: bytes, offset: int) -> None:
        """Write ``data`` (a multiple of BLOCK long when direct) at an aligned ``offset``."""
        if self.direct:
            buffer = _POOL.take() if len(data) <= PIECE else mmap.mmap(-1, len(data))  # (a 100k-tensor header)
            try:
                buffer[:len(data)] = data
                self._pwrite_direct(memoryview(buffer)[:len(data)], offset)
            finally:
                if len(buffer) == PIECE:
                    _POOL.give(buffer)
        else:
            self._pwrite_all(memoryview(data), offset)

    def close(self) -> None:
        """Release the bounce buffers and the helper thread (safe to call twice)."""
        if self._io is not None:
            self._io.stop()  # after the writes in flight
            self._io = None
        if self.direct and self._buffers:
            for buffer in self._buffers:
                _POOL.give(buffer)
            self._buffers = []


# -- reading -----------------------------------------------------------------------------------------
_libc = None
_populate_ok = sys.platform.startswith("linux")  # MADV_POPULATE_WRITE (Linux 5.14+; found out on first use)
MADV_POPULATE_WRITE = 23
_prefault_queue: queue.SimpleQueue[tuple[int, int]] | None = None
_populate_worked = False  # a failure after the first success means that memory, not the kernel


def _populate(libc: ctypes.CDLL, start: int, end: int) -> None:
    """MADV_POPULATE_WRITE over [start, end) in PIECE steps, stopping at the first failure (memory
    already freed, or a kernel without it: the reader or the copy then faults the pages itself)."""
    global _populate_ok, _populate_worked
    for chunk in range(start, end, PIECE):
        if libc.madvise(ctypes.c_void_p(chunk), ctypes.c_size_t(min(PIECE, end - chunk)), MADV_POPULATE_WRITE):
            if not _populate_worked and ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS):
                _populate_ok = False  # a kernel older than 5.14
            return
        _populate_worked = True


def _prefault_loop(jobs: queue.SimpleQueue[tuple[int, int]]) -> None:
    libc = _libc
    assert libc is not None  # loaded by prefault() before this thread starts
    while True:
        start, end = jobs.get()
        _populate(libc, start, end)


def _load_libc() -> ctypes.CDLL | None:
    global _libc, _populate_ok
    if _populate_ok and _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _populate_ok = False
    return _libc if _populate_ok else None


def _pages(tensor: torch.Tensor) -> tuple[int, int]:
    start = round_up(tensor.data_ptr(), mmap.PAGESIZE)
    return start, (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE


def prefault(tensor: torch.Tensor) -> None:
    """Ask a helper thread to fault in ``tensor``'s pages ahead of a read into it.

    Fresh memory costs a page fault per 4 KiB (host faults on a VM): done beside the disk's DMA
    instead of inside it. MADV_POPULATE_WRITE never changes memory contents, so the reader may
    overtake it, and memory freed in between is harmless."""
    global _prefault_queue
    if _load_libc() is None:
        return
    if _prefault_queue is None:
        _prefault_queue = queue.SimpleQueue()
        threading.Thread(target=_prefault_loop, args=(_prefault_queue,), name="nbguard-prefault", daemon=True).start()
    start, end = _pages(tensor)
    if end > start:
        _prefault_queue.put((start, end))


def populate(tensor: torch.Tensor) -> None:
    """Fault in the pages of ``tensor`` (CPU memory) that are not there yet, in the calling thread;
    pages already there cost a look at their page table. Contents never change."""
    libc = _load_libc()
    start, end = _pages(tensor)
    if libc is not None and end > start:
        _populate(libc, start, end)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory. (``tensor.numpy()`` would also mark
    the storage as shared with NumPy, which nbguard's change tracking then distrusts for good.)"""
    if not tensor.numel():
        return memoryview(bytearray(0))
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def _drop_cache(fd: int, offset: int, length: int) -> None:
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def open_regular(path: str) -> int:
    """A read-only descriptor of ``path`` if it is a regular file: a link is not followed, and a FIFO
    or device is refused at once instead of blocking (OSError otherwise)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                 | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or socket?)", path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
