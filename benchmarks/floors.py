"""Measurement primitives (timing, page-cache eviction, RSS, I/O counters) and the hardware floors.

The floors are what the machine can do at best with the same bytes, measured in the same run as
nbguard and its peers, so every ratio compares like with like:

* ``copy_prealloc``: ``dst.copy_(src)`` of every state tensor into tensors allocated (and faulted
  in) beforehand — the least a blocking staging step can cost.
* ``clone``: ``src.clone()`` of every tensor into fresh memory (page faults included) — what a
  staging step costs when it does not reuse its buffers.

Every timed write or allocation (here and in every tool measured) starts after ``settle()``: see
``SETTLE_MODE`` for why. One more write floor shows the VM's worst case: ``write_fsync_unprimed``,
the same write after a 3 s pause instead of priming.
* ``write_fsync``: ``os.write`` of the same bytes to one new file in the benchmark folder, then
  ``fsync`` (dd-style, 64 MiB chunks) — the least a durable save through the page cache can cost.
  Two more write floors for context: ``write_direct`` (``O_DIRECT`` from a page-aligned buffer:
  the device itself, no page cache) and ``write_chunked_writeback`` (page-cache writes that start
  writeback per 64 MiB chunk and drop each chunk's pages once on disk, so the pages are recycled).
* ``read_cold_fresh`` (context): the same cold read into freshly allocated tensors, as any restore
  into a new process must (optimizer state does not exist yet): page faults included.
* ``read_cold``: ``readinto`` a preallocated buffer from that file after evicting it from the page
  cache with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (after the fsync, so no page is dirty), each
  piece's pages dropped once read (``read_views``; ``read_cold_kept``, info: the same read keeping
  them, as a plain read does). The
  eviction is checked twice: ``read_bytes`` in ``/proc/self/io`` must grow by the file size (bytes
  that really came from the block device), and a warm read of the same file is timed for contrast.
* hashing speed of ``xxh3_128``, ``sha256`` and ``md5`` over 256 MiB.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import hashlib
import mmap
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

GiB = 2**30
MiB = 2**20
CHUNK = 64 * MiB

# Conditioning before each timed save, write or allocation ("settle"), of every tool alike.
#
# These machines are VMs whose memory balloon hands memory the guest leaves unused back to the host;
# touching such a page again costs a host page fault. A write into page-cache pages or a first touch
# of a buffer that lands on such pages runs at 0.2-0.5 GiB/s; on pages the guest freed a moment ago
# (a deleted file's page cache, in particular) it runs at bare-metal speed (~1.5 GiB/s write+fsync,
# ~5 GiB/s first touch). Which one a tool meets depends on what the previous case freed, so
# unconditioned figures swing 2-5x from round to round. "prime" (the default) writes PRIME_BYTES to a
# scratch file and deletes it just before the timed operation: every tool then meets recycled pages,
# as a training session does once its retention deletes old snapshots. "sleep" waits SETTLE_S seconds
# instead (pages handed back: the VM's worst case, much noisier); "none" does nothing.
SETTLE_MODE = "prime"
SETTLE_S = 3.0
PRIME_BYTES = 2 * GiB
_prime_buffer: np.ndarray | None = None


def settle() -> None:
    global _prime_buffer
    gc.collect()
    if SETTLE_MODE == "sleep" and SETTLE_S > 0:
        time.sleep(SETTLE_S)
    elif SETTLE_MODE == "prime" and PRIME_BYTES > 0:
        if _prime_buffer is None:
            _prime_buffer = np.ones(CHUNK, dtype=np.uint8)
        path = os.path.join(PRIME_DIR, f".prime-{os.getpid()}.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = _prime_buffer.data
            for _ in range(-(-PRIME_BYTES // CHUNK)):
                os.write(fd, view)
        finally:
            os.close(fd)
            os.remove(path)


PRIME_DIR = "."


# This VM's kernel hands freed memory back to the host in passes ("free page reporting"; its
# page_reporting module counts what it handed back in reported_kib). A pass starts ~2 s after a large
# free (a settle's deleted file, a closed guard's staging) and runs ~0.3 s; a restore timed during one
# ran slower (0.75 GiB: medians 452-537 ms against 227-234 ms; saves were rarely met, 1-2 of 92).
# ``REPORTING`` notes, for each timed operation, whether a pass overlapped it.
REPORTED_KIB = "/sys/module/page_reporting/parameters/reported_kib"


def reported_kib() -> int | None:
    """KiB handed back to the host so far, where the kernel counts it; None elsewhere."""
    try:
        with open(REPORTED_KIB) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


# How long no pass must have run before a timed restore: a pass starts ~2 s after a large free.
REPORTING_QUIET_S = 2.5
REPORTING_WAIT_LIMIT_S = 10.0


def wait_for_reporting_quiet(quiet_s: float = REPORTING_QUIET_S, limit_s: float = REPORTING_WAIT_LIMIT_S) -> float:
    """Wait until no reporting pass has run for ``quiet_s`` (at most ``limit_s``); the seconds waited.

    For the restores and their cold-read floors: a round frees GiBs right before them (a closed
    guard's staging, a peer's copies, evicted page cache), and the pass that follows ~2 s later met
    5 of 12 3 GiB restores in stop 38 (medians 1.44 s against 0.83 s clean) and 4 of 12 of their floors,
    which are I/O-bound and were not slowed. With this wait 3 of 12 restores still met one (1.08 s
    against 0.89 s). Where the kernel does not count passes, returns at once."""
    if reported_kib() is None:
        return 0.0
    started = last_change = time.monotonic()
    last = reported_kib()
    while (now := time.monotonic()) - last_change < quiet_s and now - started < limit_s:
        time.sleep(0.05)
        current = reported_kib()
        if current != last:
            last, last_change = current, time.monotonic()
    return time.monotonic() - started


@dataclass
class Stopwatch:
    """When a timed block started (``perf_counter``) and, once it has ended, how long it took."""

    started: float
    seconds: float = 0.0


class ReportingLog:
    """Timed operations by label, each with whether a reporting pass ran during it (diagnostic only:
    no sample is dropped or retaken)."""

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[float, bool]]] = {}

    @contextmanager
    def timed(self, label: str) -> Iterator[Stopwatch]:
        """Time the block (the counter is read outside the timing) and log it under ``label``."""
        before = reported_kib()
        watch = Stopwatch(time.perf_counter())
        yield watch
        watch.seconds = time.perf_counter() - watch.started
        self.add(label, watch.seconds, before, reported_kib())

    def add(self, label: str, seconds: float, before: int | None, after: int | None) -> None:
        if before is not None and after is not None:
            self.samples.setdefault(label, []).append((seconds, after != before))

    def summary(self) -> dict[str, Any]:
        out = {}
        for label, samples in self.samples.items():
            hit = [s for s, overlapped in samples if overlapped]
            clean = [s for s, overlapped in samples if not overlapped]
            out[label] = {"n": len(samples), "overlapped": len(hit),
                          "median_clean": statistics.median(clean) if clean else None,
                          "median_overlapped": statistics.median(hit) if hit else None}
        return out


REPORTING = ReportingLog()


def _gibs(nbytes: int, seconds: float | None) -> str:
    return f"{nbytes / GiB / seconds:.2f} GiB/s" if seconds else "n/a"


# -- timing and statistics ------------------------------------------------------------------------
def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median plus the spread of a list of measurements."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


# -- memory and I/O counters ----------------------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss() -> int:
    return _status("VmRSS")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRss:
    """Peak RSS increase over a block: ``VmHWM`` after it minus ``VmRSS`` before it."""

    def __enter__(self) -> PeakRss:
        gc.collect()
        self.ok = reset_peak_rss()
        self.before = rss()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = _status("VmHWM")
        self.increase = max(0, self.peak - self.before) if self.ok else None


def io_counters() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                key, value = line.split(":")
                out[key.strip()] = int(value)
    except OSError:
        pass
    return out


class IoDelta:
    """``read_bytes`` (from the block device, page faults of mmaps included) and ``rchar``
    (read syscalls) over a block."""

    def __enter__(self) -> IoDelta:
        self.start = io_counters()
        return self

    def __exit__(self, *exc: object) -> None:
        end = io_counters()
        self.read_bytes = end.get("read_bytes", 0) - self.start.get("read_bytes", 0)
        self.rchar = end.get("rchar", 0) - self.start.get("rchar", 0)
        self.write_bytes = end.get("write_bytes", 0) - self.start.get("write_bytes", 0)


# -- page cache ------------------------------------------------------------------------------------
def evict_file(path: str) -> None:
    """Drop a file's pages from the page cache (fsync first so no page is dirty)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            os.fsync(fd)
        except OSError:
            pass
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def evict_tree(folder: str) -> int:
    """Evict every file under ``folder``; returns their total size."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                evict_file(path)
                total += os.path.getsize(path)
    return total


def fsync_tree(folder: str) -> None:
    """fsync every file and folder under ``folder`` (to make peers that do not fsync durable)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def tree_size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, fs in os.walk(folder) for n in fs)


# -- raw bytes of tensors ---------------------------------------------------------------------------
def byte_views(tensors: Iterable[torch.Tensor]) -> list[memoryview]:
    """Zero-copy byte views of contiguous CPU tensors (``nbguard.stores.directio.byte_view``: not through
    NumPy, which would make nbguard's change tracking distrust them and change what is measured).
    The caller keeps the tensors alive."""
    from nbguard.stores.directio import byte_view

    if any(not t.is_contiguous() or t.device.type != "cpu" for t in tensors):
        raise ValueError("byte_views needs contiguous CPU tensors")
    return [byte_view(t) for t in tensors if t.numel()]


def write_fsync(path: str, views: Sequence[memoryview]) -> int:
    """dd-style durable write: sequential os.write in CHUNK pieces, then fsync. Returns bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    total = 0
    try:
        for view in views:
            view = view.cast("B")
            for start in range(0, len(view), CHUNK):
                piece = view[start:start + CHUNK]
                while piece:
                    n = os.write(fd, piece)
                    piece = piece[n:]
                    total += n
        os.fsync(fd)
    finally:
        os.close(fd)
    return total


def write_direct(path: str, buffer: mmap.mmap, nbytes: int) -> bool:
    """O_DIRECT write (no page cache) of ``nbytes`` (rounded up to pages) from a page-aligned buffer
    written again and again, then fsync: the device floor. False where O_DIRECT is refused."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        view = memoryview(buffer)
        left = -(-nbytes // 4096) * 4096
        while left > 0:
            piece = view[:min(len(view), left)]
            while piece:
                n = os.write(fd, piece)
                piece = piece[n:]
                left -= n
        os.fsync(fd)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


_libc = None


def _sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    _libc.sync_file_range(fd, offset, length, flags)


def write_chunked_writeback(path: str, views: Sequence[memoryview]) -> int:
    """A page-cache write that keeps recycling its own pages: after each CHUNK is written its
    writeback starts (sync_file_range WRITE); once the previous chunk is on disk (WAIT_AFTER) its
    pages are dropped (fadvise DONTNEED) and reused by the next chunk. Then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    offset, previous = 0, None
    try:
        for view in views:
            view = view.cast("B")
            for start in range(0, len(view), CHUNK):
                piece = view[start:start + CHUNK]
                length = len(piece)
                while piece:
                    n = os.write(fd, piece)
                    piece = piece[n:]
                _sync_file_range(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE
                if previous is not None:
                    _sync_file_range(fd, previous[0], previous[1], 1 | 2 | 4)  # wait for it
                    os.posix_fadvise(fd, previous[0], previous[1], os.POSIX_FADV_DONTNEED)
                previous = (offset, length)
                offset += length
        os.fsync(fd)
    finally:
        os.close(fd)
    return offset


# -- the floors ------------------------------------------------------------------------------------
class Floors:
    """One round of the floors, run in turn with the tools (see ``run.py``): copy into preallocated
    tensors, clone into fresh memory, write+fsync of the same bytes to a new file, cold and warm
    read of that file, plus the O_DIRECT and chunked-writeback writes for context.

    The preallocated copy targets are kept between rounds (and reused as the read target); the
    O_DIRECT floor writes the state's size from one page-aligned 64 MiB buffer."""

    def __init__(self) -> None:
        self.dst: list[torch.Tensor] | None = None
        self.aligned = mmap.mmap(-1, CHUNK)
        self.aligned[:] = b"\1" * CHUNK

    def once(self, model: torch.nn.Module, opt: torch.optim.Optimizer, folder: str) -> dict[str, Any]:
        tensors = [t for t in state_tensors(model, opt) if t.numel()]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if self.dst is None or [d.shape for d in self.dst] != [t.shape for t in tensors]:
            self.dst = [torch.empty_like(t) for t in tensors]
            for d, t in zip(self.dst, tensors, strict=True):
                d.copy_(t)  # faults the pages in
        out: dict[str, Any] = {"bytes": nbytes}
        settle()  # as every save it is compared with
        t0 = time.perf_counter()
        for d, t in zip(self.dst, tensors, strict=True):
            d.copy_(t)
        out["copy_prealloc"] = time.perf_counter() - t0

        settle()
        t0 = time.perf_counter()
        clones = [t.clone() for t in tensors]
        out["clone"] = time.perf_counter() - t0
        del clones

        views = byte_views(tensors)
        path = os.path.join(folder, "floor.bin")
        settle()
        t0 = time.perf_counter()
        write_fsync(path, views)
        out["write_fsync"] = time.perf_counter() - t0
        evict_file(path)
        targets = byte_views(self.dst)
        with IoDelta() as io:
            t0 = time.perf_counter()
            read_views(path, targets, drop_behind=True)
            out["read_cold"] = time.perf_counter() - t0
        out["read_cold_read_bytes"] = io.read_bytes
        t0 = time.perf_counter()
        read_views(path, targets)  # pages kept in the page cache this time (see read_views)
        out["read_cold_kept"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        read_views(path, targets)
        out["read_warm"] = time.perf_counter() - t0
        evict_file(path)
        settle()
        t0 = time.perf_counter()
        fresh = [torch.empty_like(t) for t in tensors]
        read_views(path, byte_views(fresh))
        out["read_cold_fresh"] = time.perf_counter() - t0
        del fresh
        settle()
        t0 = time.perf_counter()
        if write_direct(os.path.join(folder, "floor-direct.bin"), self.aligned, nbytes):
            out["write_direct"] = time.perf_counter() - t0
        settle()
        t0 = time.perf_counter()
        write_chunked_writeback(os.path.join(folder, "floor-chunked.bin"), views)
        out["write_chunked_writeback"] = time.perf_counter() - t0
        if SETTLE_MODE == "prime":
            gc.collect()
            time.sleep(SETTLE_S)  # let the host take unused pages back: the VM's worst case
            t0 = time.perf_counter()
            write_fsync(os.path.join(folder, "floor-unprimed.bin"), views)
            out["write_fsync_unprimed"] = time.perf_counter() - t0
        del views, targets
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        return out

    def close(self) -> None:
        self.dst = None
        self.aligned.close()


class PairedFloors:
    """Floors measured right next to the operation they bound, on the same bytes (``run.nbguard_once``).

    The floors of ``Floors`` run in their own case of a round, seconds or a minute away from the save
    or restore they are compared with; on a shared VM the disk and the CPU change speed over such
    spans (the cold read floor moved 15-25 % from one hour to the next here). A floor taken just before
    or just after the operation meets the same minute, and the median of the per-round ratios then
    measures nbguard rather than the machine's drift. Which one goes first alternates by round.

    One flat destination buffer, faulted in once and grown when needed, serves the copy and read floors."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.rounds = 0

    def next_round(self) -> bool:
        """Start a round; True when the floors go first in it."""
        self.rounds += 1
        return self.rounds % 2 == 1

    def _destination(self, nbytes: int) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = None
            gc.collect()
            self.buffer = torch.ones(nbytes, dtype=torch.uint8)  # ones: every page faulted in now
        return self.buffer

    def copy(self, tensors: Sequence[torch.Tensor], into: Sequence[torch.Tensor] | None = None) -> float:
        """Seconds to ``copy_`` every tensor into preallocated memory (as ``Floors.copy_prealloc``),
        after ``settle()`` as the save it is compared with: with ~2 GiB free, a copy right after the
        priming write took 1.35x one without it (3 GiB, 6 rounds).

        The memory is this object's own buffer, or ``into``: flat uint8 buffers, one of each tensor's
        size (a guard's staging buffers, so that the floor and the save copy into the same pages)."""
        tensors = [t for t in tensors if t.numel()]
        if into is not None:
            targets = _same_size_views(tensors, into)
        else:
            sizes = [-(-t.numel() * t.element_size() // 64) * 64 for t in tensors]
            flat = self._destination(sum(sizes))
            targets, offset = [], 0
            for t, size in zip(tensors, sizes, strict=True):
                targets.append(flat[offset:offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape))
                offset += size
        settle()
        with REPORTING.timed("copy floor") as watch:
            for d, t in zip(targets, tensors, strict=True):
                d.copy_(t)
        return watch.seconds

    def write_fsync(self, path: str, tensors: Sequence[torch.Tensor]) -> float:
        """Seconds to write the tensors' bytes to a new file and fsync it (as ``Floors.write_fsync``),
        after ``settle()``; the file is removed afterwards."""
        views = byte_views(tensors)
        settle()
        t0 = time.perf_counter()
        write_fsync(path, views)
        seconds = time.perf_counter() - t0
        os.remove(path)
        return seconds

    def read_cold(self, paths: Sequence[str]) -> tuple[float, int]:
        """(seconds, bytes from the device) to read the files, evicted first, front to back into the
        preallocated buffer, touched just before (as ``Floors.read_cold``); no reporting pass pending
        (as the restore it is compared with)."""
        wait_for_reporting_quiet()
        for path in paths:
            evict_file(path)
        destination = self._destination(sum(os.path.getsize(p) for p in paths))
        # Touched again right before, as the staging buffers a guarded restore reads into are (the run
        # prepared them): this VM's host reclaims guest memory left idle, and a 3 GiB read into this
        # buffer, last written minutes before, took 3.4-3.6 s against 1.4 s for the floors case's read.
        destination.fill_(1)
        view = byte_views([destination])[0]
        with IoDelta() as io, REPORTING.timed("cold read floor") as watch:
            offset = 0
            for path in paths:
                offset += read_views(path, [view[offset:]], drop_behind=True)
        return watch.seconds, io.read_bytes


def _same_size_views(tensors: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """For each tensor, a view with its dtype and shape of a distinct buffer of exactly its byte size."""
    free: dict[int, list[torch.Tensor]] = {}
    for buffer in buffers:
        free.setdefault(buffer.numel() * buffer.element_size(), []).append(buffer)
    views = []
    for t in tensors:
        matching = free.get(t.numel() * t.element_size())
        if not matching:
            raise ValueError(f"no buffer of {t.numel() * t.element_size()} bytes left for a tensor of shape {tuple(t.shape)}")
        views.append(matching.pop().view(torch.uint8).view(t.dtype).view(t.shape))
    return views


def state_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = list(model.state_dict().values())
    for st in opt.state.values():
        out.extend(v for v in st.values() if isinstance(v, torch.Tensor))
    return out


def read_views(path: str, views: Sequence[memoryview], drop_behind: bool = False) -> int:
    """Read a file front to back into a sequence of buffers (unbuffered readinto, CHUNK pieces).

    ``drop_behind``: drop each piece's page-cache pages once it was read, so the read holds one
    piece of page cache instead of the whole file. That is the read floor: on this VM the guest
    reports free memory to the host (virtio-balloon free page reporting, 2 MiB blocks), and a plain
    read of 3 GiB takes its page-cache pages from that memory, each block faulted back in by the
    host: 2.3-5.5 s (median 5.1) against 1.0-1.3 s (1.2) with the pages dropped behind (3 GiB, 6
    rounds in one process, the same files, order permuted; a guarded restore, which drops its pages
    too, took 1.07-2.05 s, median 1.28)."""
    done = 0
    with open(path, "rb", buffering=0) as f:
        for view in views:
            view = view.cast("B")
            pos = 0
            while pos < len(view):
                n = f.readinto(view[pos:pos + CHUNK])
                if not n:
                    return done
                if drop_behind:
                    os.posix_fadvise(f.fileno(), done, n, os.POSIX_FADV_DONTNEED)
                pos += n
                done += n
    return done


def hash_speeds(repeats: int) -> dict[str, float]:
    """GiB/s of xxh3_128, sha256 and md5 over 256 MiB of random bytes."""
    import xxhash

    data = np.random.default_rng(0).integers(0, 256, 256 * MiB, dtype=np.uint8)
    view = data.data
    hashers: dict[str, Callable[[], Any]] = {
        "xxh3_128": functools.partial(xxhash.xxh3_128, view),
        "sha256": functools.partial(hashlib.sha256, view),
        "md5": functools.partial(hashlib.md5, view),
    }
    res: dict[str, float] = {}
    for name, fn in hashers.items():
        fn().digest()
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            fn().digest()
            times.append(time.perf_counter() - t0)
        res[name] = 0.25 / statistics.median(times)
    del data, view, hashers
    return res


# -- state helpers shared by every case ----------------------------------------------------------------
@torch.no_grad()
def advance(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Change every byte of the state in place (as an optimizer step does)."""
    for p in model.parameters():
        p.mul_(1.0001)
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                v.add_(1) if k == "step" else v.mul_(0.999)


@torch.no_grad()
def rehome(opt: torch.optim.Optimizer, model: torch.nn.Module | None = None) -> None:
    """Give the state tensors fresh private memory after a case: restores may leave optimizer state
    on a file mapping, and a peer may have handed the live tensors to NumPy (torchsnapshot does),
    which marks their storages for good. Every case then starts from the same kind of memory."""
    if model is not None:
        for p in model.parameters():
            p.data = p.detach().clone()
        for module in model.modules():
            for name, b in list(module.named_buffers(recurse=False)):
                if b is not None:
                    setattr(module, name, b.clone())
    for st in opt.state.values():
        for k, v in list(st.items()):
            if isinstance(v, torch.Tensor):
                st[k] = v.clone()


@torch.no_grad()
def touch(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Read one value per 4 KiB page of every state tensor, so a restore that left tensors on a lazy
    file mapping (torch.load(mmap=True)) pays for reading them inside the timed region like the others."""
    tensors = list(model.state_dict().values()) + [
        v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        if t.numel():
            flat = t.reshape(-1)
            step = max(1, 4096 // t.element_size())
            flat[::step].sum()
