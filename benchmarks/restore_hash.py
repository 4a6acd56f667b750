"""The restore's hash pass alone, cold, against reading the same file once into memory.

    python -m benchmarks.restore_hash --size-mib 768 --repeats 5

Cases, each after evicting the file from the page cache, interleaved round by round:

* ``floor``: one ``readinto`` of the whole file into a touched buffer (what the restore's cold-read
  floor is);
* ``buffered``: ``FileReader`` hashing through two reused 16 MiB buffers (a read-ahead thread fills
  one while the other is hashed): the kernel copies every byte into them;
* ``mapped``: ``FileReader`` on a local disk: each 16 MiB piece mapped and read in with
  ``MADV_POPULATE_READ`` by the read-ahead thread, hashed where it lies in the page cache.

Ratios are to the same round's floor (the disk's speed drifts on a shared VM).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import xxhash

from nbguard.stores import mapped
from nbguard.stores.filereader import FileReader

MiB = 2**20


def _evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    nbytes = args.size_mib * MiB
    folder = tempfile.mkdtemp(prefix="nbguard-hash-", dir=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(folder, "blob.bin")
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).tobytes())
        os.fsync(f.fileno())
    target = np.ones(nbytes, dtype=np.uint8)

    def floor() -> None:
        view, done = memoryview(target.data), 0
        with open(path, "rb", buffering=0) as f:
            while done < nbytes:
                done += f.readinto(view[done:]) or nbytes

    def hash_with(use_map: bool) -> None:
        reader = FileReader(path)
        reader._can_map = use_map and mapped.can_map(reader._file.fileno())
        try:
            reader.hash_range(0, nbytes, xxhash.xxh3_128())
        finally:
            reader.close()

    cases = {"floor": floor, "buffered": lambda: hash_with(False), "mapped": lambda: hash_with(True)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for _ in range(args.repeats):
            for name, run in cases.items():
                _evict(path)
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    finally:
        os.remove(path)
        os.rmdir(folder)
    print(f"{args.size_mib} MiB, {args.repeats} rounds, cold; median (min-max); x floor: paired per round")
    for name, values in times.items():
        ratios = [v / f for v, f in zip(values, times["floor"], strict=True)]
        print(f"{name:9s} {statistics.median(values) * 1000:6.0f} ms ({min(values) * 1000:.0f}-{max(values) * 1000:.0f})"
              f"  {statistics.median(ratios):.2f}x floor ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
