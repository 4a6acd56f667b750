"""Cold restores side by side: nbguard trees (this one, and e.g. main's), ``torch.load`` of the same
state, and the cold-read floor, each in a fresh process, interleaved round by round.

    python -m benchmarks.restore_ab --size-gib 1.5 --repeats 3 --tree main=/path/to/main/checkout

Each measurement builds the live state (the benchmark's Linear stack + Adam, one step taken),
evicts the files from the page cache, restores, and reports the wall time and the peak RSS
increase (``VmHWM`` after minus ``VmRSS`` before). The floor reads the blob file into an already
touched buffer of its size. Each case's time is also given as a ratio to the floor of its own
round (the disk's speed drifts between rounds on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import gc, os, sys, time
import torch
sys.path.append(sys.argv[4])  # this checkout's benchmarks; nbguard comes from PYTHONPATH
from benchmarks import floors as fl
from benchmarks.run import build_state
mode, folder, size = sys.argv[1], sys.argv[2], float(sys.argv[3])
model, opt = build_state(size, seed=1)
if mode == "setup":
    import nbguard
    m0, o0 = build_state(size, seed=0)
    nbguard.Guard(folder, run="ab", report=None).save({"model": m0, "opt": o0}, wait=True).result()
    with open(os.path.join(folder, "ckpt.pt"), "wb") as f:
        torch.save({"model": m0.state_dict(), "opt": o0.state_dict()}, f)
    sys.exit(0)
blobs = [os.path.join(r, n) for r, _, names in os.walk(os.path.join(folder, "blobs")) for n in names]
buffer = torch.ones(max(map(os.path.getsize, blobs)), dtype=torch.uint8) if mode == "floor" else None
fl.evict_tree(folder)
gc.collect()
with fl.IoDelta() as io, fl.PeakRss() as mem:
    t0 = time.perf_counter()
    if mode == "floor":
        view = fl.byte_views([buffer])[0]
        for path in blobs:
            with open(path, "rb", buffering=0) as f:
                f.readinto(view)
    elif mode == "torch":
        sd = torch.load(os.path.join(folder, "ckpt.pt"), weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["opt"])
    elif mode == "resume":  # as %%checkpointed resumes: the guard's prepare started, then its restore
        import nbguard
        guard = nbguard.Guard(folder, run="ab", report=None)
        guard.prepare({"model": model, "opt": opt})
        guard.restore({"model": model, "opt": opt})
    else:
        import nbguard
        nbguard.load(folder, "latest").restore({"model": model, "opt": opt}, rng=False)
    fl.touch(model, opt)
    elapsed = time.perf_counter() - t0
print("RESULT", elapsed, mem.increase, io.read_bytes)
"""


def _run(args: list[str], pythonpath: str) -> tuple[float, int, int]:
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, *args, HERE], env=env, capture_output=True, text=True,
                         cwd=tempfile.gettempdir())
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    if args[0] == "setup" and out.returncode == 0:
        return 0.0, 0, 0
    if not lines:
        raise SystemExit(f"{args[0]} failed:\n{out.stderr[-3000:]}")
    _, seconds, peak, read = lines[0].split()
    return float(seconds), int(peak), int(read)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.restore_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=0.75)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                        help="another nbguard checkout to compare (its nbguard is imported)")
    parser.add_argument("--how", choices=("load", "resume"), default="load",
                        help="load: nbguard.load(...).restore (a script); resume: a Guard's prepare started, "
                             "then its restore (%%%%checkpointed after a restart)")
    parser.add_argument("--folder", default=None,
                        help="a new or empty folder for the snapshot and the torch file, emptied at the end "
                             "(default: a temp folder)")
    args = parser.parse_args(argv)
    trees = {"this": HERE} | dict(t.split("=", 1) for t in args.tree)
    if args.folder and os.path.isdir(args.folder) and os.listdir(args.folder):
        parser.error(f"--folder {args.folder} is not empty: name a new or empty folder (its contents are removed at the end)")
    folder = args.folder or tempfile.mkdtemp(prefix="nbguard-restore-ab-")
    os.makedirs(folder, exist_ok=True)
    try:
        _run(["setup", folder, str(args.size_gib)], HERE)
        cases = [("floor", "floor", HERE)] + [(name, "nbguard" if args.how == "load" else "resume", path)
                                             for name, path in trees.items()] + \
            [("torch.load", "torch", HERE)]
        results: dict[str, list[tuple[float, int, int]]] = {name: [] for name, _, _ in cases}
        loads = [os.getloadavg()[0]]
        for _ in range(args.repeats):
            for name, mode, path in cases:
                results[name].append(_run([mode, folder, str(args.size_gib)], path))
            loads.append(os.getloadavg()[0])
    finally:
        if args.folder:  # the folder named stays, empty, as it was given
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    floors = [r[0] for r in results["floor"]]
    print(f"{args.size_gib} GiB state, {args.repeats} rounds; load average per round: {[round(x, 1) for x in loads]}")
    print("median (min-max) of each round; x floor: the ratio to the same round's floor (paired)")
    for name, runs in results.items():
        seconds = [r[0] for r in runs]
        ratios = [s / f for s, f in zip(seconds, floors, strict=True)]
        print(f"{name:12s} {statistics.median(seconds) * 1000:6.0f} ms ({min(seconds) * 1000:.0f}-{max(seconds) * 1000:.0f})"
              f"  {statistics.median(ratios):4.2f}x floor ({min(ratios):.2f}-{max(ratios):.2f})"
              f"  peak RSS +{statistics.median(r[1] for r in runs) / 2**20:.0f} MiB"
              f"  read {statistics.median(r[2] for r in runs) / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
