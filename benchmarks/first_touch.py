"""What a restore that keeps displaced bytes would pay: touching fresh memory, against the copy it hides.

    python -m benchmarks.first_touch --size-gib 3 --repeats 4

A restore that reads straight into the live tensors must keep their old bytes for the undo, in a
state's worth of memory nobody has touched yet; the two-pass restore instead copies the hashed bytes
from the page cache into the live tensors at the end. Cases, each after ``settle()`` (prime: 2 GiB
written to a scratch file and deleted, as every timed case of ``benchmarks.run``):

* ``first touch 4 KiB``: ``MADV_POPULATE_WRITE`` over a fresh anonymous map (faults in every page);
* ``first touch THP``: the same after ``MADV_HUGEPAGE`` (transparent huge pages, where enabled);
* ``copy from page cache``: ``preadv`` of a cached file into touched memory, 16 MiB pieces on two
  threads (the restore's last pass, ``FileReader.copy_cached``);
* ``copy_ touched``: ``copy_`` between two touched buffers (the memory's own speed).
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import threading
import time

import torch

from benchmarks import floors as fl

GiB = 2**30
PIECE = 16 * 2**20
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def first_touch(nbytes: int, huge: bool) -> float:
    region = mmap.mmap(-1, nbytes)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    try:
        if huge:
            _libc.madvise(address, nbytes, MADV_HUGEPAGE)
        start = time.perf_counter()
        if _libc.madvise(address, nbytes, MADV_POPULATE_WRITE):
            raise OSError(ctypes.get_errno(), "MADV_POPULATE_WRITE (Linux 5.14+) refused")
        return time.perf_counter() - start
    finally:
        del address
        region.close()


def copy_from_cache(fd: int, target: memoryview) -> float:
    spans = list(range(0, len(target), PIECE))

    def work(first: int) -> None:
        for begin in spans[first::2]:
            os.preadv(fd, [target[begin:begin + PIECE]], begin)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def copy_touched(target: torch.Tensor, source: torch.Tensor) -> float:
    start = time.perf_counter()
    target.copy_(source)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--folder", default=".", help="where the cached file and the priming file go")
    args = parser.parse_args()
    nbytes = int(args.size_gib * GiB) // PIECE * PIECE
    fl.PRIME_DIR = args.folder
    source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    touched = torch.ones(nbytes, dtype=torch.uint8)
    path = os.path.join(args.folder, f".first-touch-{os.getpid()}.bin")
    with open(path, "wb") as f:
        f.write(source.numpy().data)
    fd = os.open(path, os.O_RDONLY)
    cases = {
        "first touch 4 KiB": lambda: first_touch(nbytes, huge=False),
        "first touch THP": lambda: first_touch(nbytes, huge=True),
        "copy from page cache": lambda: copy_from_cache(fd, touched.numpy().data),
        "copy_ touched": lambda: copy_touched(touched, source),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for _ in range(args.repeats):
            for name, case in cases.items():
                fl.settle()
                times[name].append(case())
    finally:
        os.close(fd)
        os.remove(path)
    print(f"{nbytes / GiB:.2f} GiB, {args.repeats} rounds; median (min-max)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:22s} {median:6.3f} s ({min(values):.3f}-{max(values):.3f})  {nbytes / GiB / median:5.1f} GiB/s")


if __name__ == "__main__":
    main()
