"""A save and a resume of a large state inside a memory limit, as on a Colab machine (12.7 GiB).

    python -m benchmarks.memory_limit --size-gib 3 --limit-gib 12.7

Runs two child processes in a memory cgroup of that limit (cgroup v1 ``memory.limit_in_bytes`` or
v2 ``memory.max``; needs the right to create one, as root here; no swap is assumed): the first builds
the benchmark's state (a Linear stack with Adam, one step taken) and saves it through a ``Guard``, as
a training run does; the second, a fresh process as after a restart, builds the state again with
other values and resumes it as ``%%checkpointed`` does (the guard's ``prepare`` started, then its
``restore``), then without a guard (``nbguard.load(...).restore``), and checks the weights equal the
saved ones. Prints each child's outcome, its peak RSS and the cgroup's peak usage (page cache
included, which the kernel reclaims under the limit before it kills anything).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import resource, sys, torch
sys.path.insert(0, sys.argv[3])
import nbguard
from benchmarks.run import build_state
mode, folder, size = sys.argv[1], sys.argv[2], float(sys.argv[4])
if mode == "save":
    model, opt = build_state(size, seed=0)
    nbguard.Guard(folder, run="limit", report=None).save({"model": model, "opt": opt}, wait=True).result()
    checksum = sum(float(p.double().sum()) for p in model.parameters())
    print("CHECKSUM", repr(checksum))
else:
    model, opt = build_state(size, seed=1)
    guard = nbguard.Guard(folder, run="limit", report=None)
    guard.prepare({"model": model, "opt": opt})
    guard.restore({"model": model, "opt": opt})
    print("CHECKSUM", repr(sum(float(p.double().sum()) for p in model.parameters())))
    guard.close()
    del guard
    nbguard.load(folder, "latest").restore({"model": model, "opt": opt}, rng=False)
    print("CHECKSUM", repr(sum(float(p.double().sum()) for p in model.parameters())))
print("PEAK_RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


class MemoryCgroup:
    """A memory cgroup with a hard limit, created for the run and removed after it."""

    def __init__(self, limit: int) -> None:
        v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        root = "/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/memory"
        self.path = tempfile.mkdtemp(prefix="nbguard-limit-", dir=root)
        self.v2 = v2
        with open(os.path.join(self.path, "memory.max" if v2 else "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit))
        if not v2 and os.path.exists(os.path.join(self.path, "memory.memsw.limit_in_bytes")):
            with open(os.path.join(self.path, "memory.memsw.limit_in_bytes"), "w") as f:
                f.write(str(limit))

    def enter(self) -> None:
        """Called in the child before it runs (``preexec_fn``): move it into the group."""
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def peak(self) -> int | None:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        try:
            with open(os.path.join(self.path, name)) as f:
                return int(f.read())
        except OSError:
            return None

    def reset_peak(self) -> None:
        if not self.v2:
            with open(os.path.join(self.path, "memory.max_usage_in_bytes"), "w") as f:
                f.write("0")

    def remove(self) -> None:
        os.rmdir(self.path)


def _child(group: MemoryCgroup, mode: str, folder: str, size: float) -> tuple[int, list[str], str]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, folder, HERE, str(size)], capture_output=True, text=True,
                         preexec_fn=group.enter, cwd=tempfile.gettempdir())
    return out.returncode, out.stdout.splitlines(), out.stderr[-2000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_limit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=3.0, help="the state's size (parameters and Adam's state)")
    parser.add_argument("--limit-gib", type=float, default=12.7, help="the memory limit (Colab's machine: 12.7)")
    parser.add_argument("--folder", default=None,
                        help="where the snapshot goes (default: a temp folder, removed at the end; a folder named here is kept)")
    args = parser.parse_args(argv)
    folder = args.folder or tempfile.mkdtemp(prefix="nbguard-limit-")
    group = MemoryCgroup(int(args.limit_gib * 2**30))
    ok = True
    checksums: list[str] = []
    try:
        for mode in ("save", "resume"):
            group.reset_peak()
            rc, lines, err = _child(group, mode, folder, args.size_gib)
            peak_rss = next((int(x.split()[1]) for x in lines if x.startswith("PEAK_RSS")), None)
            checksums += [x.split()[1] for x in lines if x.startswith("CHECKSUM")]
            peak = group.peak()
            print(f"{mode}: exit {rc}, peak RSS {peak_rss / 2**30:.2f} GiB" if peak_rss else f"{mode}: exit {rc}",
                  f"cgroup peak {peak / 2**30:.2f} GiB" if peak else "", sep=", ")
            if rc != 0:
                ok = False
                print("killed: out of memory in the limit" if rc == -9 else err)
                break
    finally:
        group.remove()
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    same = len(checksums) == 3 and len(set(checksums)) == 1
    print(f"{args.size_gib} GiB state in a {args.limit_gib} GiB limit: "
          f"{'saved and resumed, weights equal to the saved ones' if ok and same else 'FAILED'} "
          f"(checksums {checksums})")
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
