"""Would writing a snapshot while the next one is staged slow the stall? (a design question, issue 17)

Until durable = stall + write today: the writer starts once every tensor is staged. Starting it
during the staging copy would save up to the stall's length, but on 2 cores the writer's hashing
and bounce copies compete with the copy the training waits for. This times, in one process and
alternating rounds, a copy of SIZE GiB into preallocated memory alone and while a thread writes
another SIZE GiB buffer the way nbguard does (xxh3-128 of each 16 MiB piece, ``SequentialWriter``
with ``O_DIRECT``, then fsync), and that write alone and beside the copy.

    python -m benchmarks.write_overlap [--size-gib 3] [--rounds 6] [--folder .]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch
import xxhash

from nbguard.stores import directio

GiB = 2**30


def write_like_nbguard(buffer: torch.Tensor, path: str) -> float:
    """Seconds to hash and write ``buffer`` through nbguard's direct writer, fsync included."""
    t0 = time.perf_counter()
    fd = directio.open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    direct = fd is not None
    if fd is None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        writer = directio.SequentialWriter(fd, direct=direct, start=0)
        hasher, view = xxhash.xxh3_128(), directio.byte_view(buffer)
        for offset in range(0, len(view), directio.PIECE):
            piece = view[offset:offset + directio.PIECE]
            hasher.update(piece)
            writer.write(piece)
        writer.finish()
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--folder", default=".", help="where the written file goes (removed afterwards)")
    args = parser.parse_args(argv)
    n = int(args.size_gib * GiB)
    live, staging, previous = (torch.ones(n, dtype=torch.uint8) for _ in range(3))  # ones: faulted in
    path = os.path.join(args.folder, "nbguard-write-overlap.bin")

    def copy() -> float:
        live.add_(1)  # training writes the state between saves
        t0 = time.perf_counter()
        staging.copy_(live)
        return time.perf_counter() - t0

    rows: dict[str, list[float]] = {"copy alone": [], "copy while writing": [], "write alone": [], "write beside the copy": []}
    try:
        for round_ in range(args.rounds):
            rows["copy alone"].append(copy())
            rows["write alone"].append(write_like_nbguard(previous, path))
            thread = threading.Thread(target=lambda: rows["write beside the copy"].append(write_like_nbguard(previous, path)))
            thread.start()
            time.sleep(0.05)  # the writer is under way, as it would be one piece after staging began
            rows["copy while writing"].append(copy())
            thread.join()
            print(f"round {round_}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in rows.items()), flush=True)
    finally:
        if os.path.exists(path):
            os.remove(path)
    print(f"{args.size_gib:g} GiB, {args.rounds} rounds, median (range):")
    for name, values in rows.items():
        print(f"  {name:22} {statistics.median(values):.3f} s ({min(values):.3f}-{max(values):.3f})")
    ratio = statistics.median(b / a for a, b in zip(rows["copy alone"], rows["copy while writing"], strict=True))
    print(f"  copy while writing / copy alone, median of rounds: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
