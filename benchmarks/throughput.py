"""Lost training throughput as a user pays it, measured end to end.

A script's training function runs plain and under ``@nbguard.checkpointed(every=CADENCE)``, each in
a fresh process, for the same number of steps, the two interleaved A B, B A, ... so that a drift of
the shared machine's speed hits both sides alike. The guarded time covers everything nbguard adds:
its import, the guard and session, state discovery, loop rewriting and the safe point at every
iteration, staging buffers prefaulted in the background, the first save (fresh buffers), every
timer save, the final save and the wait until it is durable. Lost throughput of a pair is
``guarded seconds / plain seconds - 1``; the figure is the median of the pairs, with their range.
Each process also times plain steps (an eighth of the run) before and after its run, so a pair can
be judged against the speed of its own processes too (``lost_vs_reference``), and reports its minor
page faults and CPU seconds. Both sides run with glibc's malloc thresholds pinned (``PINNED_MALLOC``).

    python -m benchmarks.throughput --cadence 30s --seconds 120 --pairs 3
    python -m benchmarks.throughput --cadence 5m --seconds 400 --pairs 1   # the default cadence
    python -m benchmarks.throughput --cadence 5m --seconds 400 --pairs 3 --layout side-by-side

``--layout side-by-side`` runs the two sides at the same time instead, one CPU each
(``measure_side_by_side``): a finer instrument where the machine's speed drifts between processes.

The model is ``benchmarks.training``'s MLP (~10.5 M parameters, ~126 MiB of state with Adam).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import functools
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, sys.argv[5])
from benchmarks.training import make_model

mode, folder, steps, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model, opt = make_model()
gen = torch.Generator().manual_seed(1)
xs = torch.randn(16, 128, 1024, generator=gen)
ys = torch.randint(0, 10, (16, 128), generator=gen)


MARKS = []
mark = MARKS.append  # a bound method: discovery sees no list that the loop mutates, so it saves none


def train(steps):
    mark(time.perf_counter())
    for step in range(steps):
        i = step % len(xs)
        loss = F.cross_entropy(model(xs[i]), ys[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mark(time.perf_counter())
    return float(loss.detach())


def warm(n):
    for i in range(n):
        loss = F.cross_entropy(model(xs[i % 16]), ys[i % 16])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


warm(20)
if mode == "calibrate":
    t0 = time.perf_counter()
    warm(steps)
    print(json.dumps({"step_s": (time.perf_counter() - t0) / steps}))
    sys.exit(0)
reference = max(1, steps // 8)  # plain steps timed in this very process before and after the run
r0 = time.perf_counter()
warm(reference)
before = time.perf_counter() - r0
MARKS.clear()
t0 = time.perf_counter()
SAVES = []
if mode == "guarded":
    import nbguard
    save = nbguard.Guard.save

    def timed_save(self, *args, **kwargs):  # when each save began; every save of a run goes through here
        SAVES.append(time.perf_counter())
        return save(self, *args, **kwargs)

    nbguard.Guard.save = timed_save
    fn = nbguard.checkpointed(every=every, dir=folder, name="bench")(train)
else:
    fn = train
final_loss = fn(steps)
seconds = time.perf_counter() - t0
r1 = time.perf_counter()
warm(reference)
after = time.perf_counter() - r1
saves = len(nbguard.Catalog(folder).snapshots()) if mode == "guarded" else 0
import resource
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "saves_kept": saves, "final_loss": final_loss,
                  "reference_s": (before + after) / 2 * steps / reference,
                  "threads": torch.get_num_threads(), "cpus": sorted(os.sched_getaffinity(0)), "minor_faults": usage.ru_minflt,
                  "cpu_s": usage.ru_utime + usage.ru_stime,
                  "outside_loop_s": seconds - (MARKS[-1] - MARKS[0]),
                  "step_s": [b - a for a, b in zip(MARKS, MARKS[1:])],
                  "save_at": [t - MARKS[0] for t in SAVES]}))
"""


# glibc's malloc gives a freed block of a few MiB back to the kernel (a dynamic mmap threshold, and
# trimming of the heap's top), so every step's gradients (set_to_none=True) land on fresh pages: here
# about 10,000 minor page faults a step, 2.7 to 4.7 million in a 30 s run, and that number swings by
# ±1 million between two processes doing the same work, on either side. That is the allocator's luck,
# not nbguard's cost, and it is larger than what is measured. "pinned" (the default) fixes both
# thresholds for both sides alike, so freed blocks are reused; "default" leaves glibc as it is.
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**32)}


@functools.cache
def _child_script() -> str:
    """``CHILD`` as a file. It must be one: nbguard rewrites a function's loops from its source, and
    code run by ``python -c`` has none, so under ``-c`` the guarded run had no safe point and saved
    only when its loop had ended (which is what this benchmark measured until stop 26)."""
    fd, path = tempfile.mkstemp(prefix="nbguard_throughput_child_", suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(CHILD)
    atexit.register(os.remove, path)
    return path


# Two plain processes doing the same steps end on the same loss only most of the time here: 10 plain
# runs of 8 steps (stop 33) ended on 2.190335988998413 seven times and 2.190005302429199 three times
# (torch's 2-thread CPU kernels do not always sum in one order across processes); a guarded run
# differs as often. Exact equality made one test of this benchmark fail about one time in three. The
# tolerance is absolute at the scale of the starting loss (~2.3): after 7263 steps both sides of a
# 5-minute pair had learned the 16 batches by heart, 2.40e-07 against 2.64e-07, which a relative
# tolerance refused.
LOSS_TOLERANCE = 1e-3


def check_same_work(a: dict[str, Any], b: dict[str, Any]) -> None:
    """RuntimeError unless two runs trained the same number of steps (what a run that skipped or
    repeated steps would not) to nearly the same loss."""
    if len(a["step_s"]) != len(b["step_s"]):
        raise RuntimeError(f"the two runs did not do the same work: {len(a['step_s'])} vs {len(b['step_s'])} steps")
    if abs(a["final_loss"] - b["final_loss"]) > LOSS_TOLERANCE * max(1.0, abs(a["final_loss"])):
        raise RuntimeError(f"the two runs did not do the same work: final loss {a['final_loss']!r} vs {b['final_loss']!r}")


# A run meant to hold a timer save is planned this much longer than its cadence: its steps are
# counted from a short calibration, and a run whose steps then ran faster (stop 32: 62 ms calibrated,
# 52 ms run, a 310 s run at 5m trained 264 s) would otherwise end before the cadence came round.
MARGIN = 1.3


def _check_saved_in_loop(guarded: dict[str, Any], cadence: str, planned_s: float | None = None) -> None:
    """RuntimeError if a guarded run saved only outside its loop though a timer save was due in it:
    it trained longer than its cadence, or it was planned (``planned_s``) to."""
    trained = sum(guarded["step_s"])
    every = _seconds(cadence)
    if _in_loop(guarded):
        return
    if trained > every + 1:
        raise RuntimeError(f"the guarded run trained {trained:.0f} s at --every {cadence} and "
                           "never saved inside its loop: nbguard found no safe point in it")
    if planned_s is not None and planned_s > every:
        raise RuntimeError(f"the guarded run was planned for {planned_s:g} s at --every {cadence} but its steps ran "
                           f"faster than calibrated: it trained {trained:.0f} s and held no timer save, so it measured "
                           f"none; give --seconds at least {MARGIN:g}x the cadence")


def check_seconds(cadence: str, seconds: float) -> None:
    """ValueError for a run planned longer than its cadence but within ``MARGIN`` of it: a timer save
    is meant to fall inside it, and steps a little faster than calibrated would leave none."""
    every = _seconds(cadence)
    if every < seconds < MARGIN * every:
        raise ValueError(f"--seconds {seconds:g} is too close to --cadence {cadence} ({every:g} s): a run whose steps go "
                         f"a little faster than calibrated would hold no timer save; use --seconds {MARGIN * every:g} or "
                         f"more (or less than {every:g} to measure the fixed costs alone)")


def _start(mode: str, folder: str, steps: int, every: str, malloc: str = "pinned",
           cpu: int | None = None) -> subprocess.Popen:
    """A child process running ``CHILD``; with ``cpu``, it and every thread it starts (nbguard's
    writer too) run on that one CPU, torch with one thread."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    if malloc == "pinned":
        env.update(PINNED_MALLOC)
    pin = None
    if cpu is not None:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        pin = functools.partial(os.sched_setaffinity, 0, {cpu})
    return subprocess.Popen([sys.executable, _child_script(), mode, folder, str(steps), every, HERE], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=pin)


def _finish(mode: str, process: subprocess.Popen) -> dict[str, Any]:
    try:
        stdout, stderr = process.communicate(timeout=3600)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def _child(mode: str, folder: str, steps: int, every: str, malloc: str = "pinned", cpu: int | None = None) -> dict[str, Any]:
    return _finish(mode, _start(mode, folder, steps, every, malloc, cpu))


def measure(cadence: str, seconds: float, pairs: int, log: Any = print, malloc: str = "pinned",
            null_pairs: int = 0) -> dict[str, Any]:
    """Interleaved plain/guarded runs of ``seconds`` each; see the module docstring and ``PINNED_MALLOC``.
    ``null_pairs`` plain/plain pairs run first: what the figures read when nothing was added."""
    scratch = tempfile.mkdtemp(prefix="nbguard-throughput-")
    try:
        step_s = _child("calibrate", scratch, 60, cadence, malloc)["step_s"]
        steps = max(1, round(seconds / step_s))
        log(f"throughput @{cadence}: {steps} steps per run (~{step_s * 1e3:.0f} ms/step), {pairs} pair(s), malloc {malloc}")
        # Discarded: the first full-length process after a pause ran up to 30 % slower here, whichever
        # side it was (measured: plain 32.0 s then guarded 21.4 s; guarded 26.0 s then plain 25.0 s).
        _child("plain", os.path.join(scratch, "warm-up"), max(1, steps // 3), cadence, malloc)
        nulls: list[float] = []
        nulls_drift_free: list[float] = []
        nulls_at_saves: list[float] = []
        for index in range(null_pairs):
            first, second = (_child("plain", os.path.join(scratch, f"null-{index}-{side}"), steps, cadence, malloc)
                             for side in range(2))
            nulls.append(second["seconds"] / first["seconds"] - 1)
            nulls_drift_free.append(lost_drift_free(first, second))
            nulls_at_saves.append(lost_drift_free(first, second, around=cadence_moments(cadence, first)))
            log(f"  null pair {index}: plain {first['seconds']:.1f} s, plain {second['seconds']:.1f} s -> {nulls[-1]:+.2%}; "
                f"drift-free {nulls_drift_free[-1]:+.2%}; at saves {nulls_at_saves[-1]:+.2%}")
        rounds = []
        for pair in range(pairs):
            times = {}
            for mode in (("plain", "guarded") if pair % 2 == 0 else ("guarded", "plain")):
                folder = os.path.join(scratch, f"run-{pair}-{mode}")
                shutil.rmtree(folder, ignore_errors=True)
                times[mode] = _child(mode, folder, steps, cadence, malloc)
                shutil.rmtree(folder, ignore_errors=True)
            check_same_work(times["plain"], times["guarded"])
            lost = times["guarded"]["seconds"] / times["plain"]["seconds"] - 1
            # each run's time over the same process's plain reference steps (its speed, which drifts
            # by ±10 % from process to process here, measured in its own CPU seconds)
            relative = {m: t["seconds"] / t["reference_s"] for m, t in times.items()}
            lost_ref = relative["guarded"] / relative["plain"] - 1
            _check_saved_in_loop(times["guarded"], cadence, seconds)
            drift_free = lost_drift_free(times["plain"], times["guarded"])
            at_saves = lost_drift_free(times["plain"], times["guarded"], around=save_moments(times["guarded"]))
            rounds.append({"plain_s": times["plain"]["seconds"], "guarded_s": times["guarded"]["seconds"],
                           "lost": lost, "lost_vs_reference": lost_ref, "lost_drift_free": drift_free,
                           "lost_at_saves": at_saves, "save_at": times["guarded"]["save_at"],
                           "saves_in_loop": _in_loop(times["guarded"]),
                           "outside_loop_s": [times["plain"]["outside_loop_s"], times["guarded"]["outside_loop_s"]],
                           "saves_kept": times["guarded"]["saves_kept"],
                           "reference_s": [times["plain"]["reference_s"], times["guarded"]["reference_s"]],
                           "minor_faults": [times["plain"]["minor_faults"], times["guarded"]["minor_faults"]],
                           "cpu_s": [times["plain"]["cpu_s"], times["guarded"]["cpu_s"]]})
            log(f"  pair {pair}: plain {times['plain']['seconds']:.1f} s, guarded {times['guarded']['seconds']:.1f} s"
                f" -> lost {lost:+.2%}; against each process's own reference steps {lost_ref:+.2%}; drift-free "
                f"{drift_free:+.2%}, at saves {at_saves:+.2%} (minor page faults {times['plain']['minor_faults']} / "
                f"{times['guarded']['minor_faults']}, CPU {times['plain']['cpu_s']:.0f} / {times['guarded']['cpu_s']:.0f} s)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"layout": "sequential", "cadence": cadence, "seconds": seconds, "steps": steps, "step_s": step_s,
            "malloc": malloc, "pairs": rounds, "null": nulls, "null_drift_free": nulls_drift_free,
            "null_at_saves": nulls_at_saves, **_spread(rounds)}


# Steps within this many seconds either side of a step set its local pace (``drift_free_seconds``).
# The machine drifts over tens of seconds; a save's stall and its writer's work last well under a
# second at this benchmark's 126 MiB, so they stay a small minority of any window.
WINDOW_S = 2.0
# What ``drift_free_seconds(around=...)`` counts around each save: from 1 s before it (its stall
# falls in the step that holds the safe point) to 5 s after (the writer's hashing and direct I/O of
# a 126 MiB state take well under a second here).
SPAN = (1.0, 5.0)


def drift_free_seconds(run: dict[str, Any], pace: float, window_s: float = WINDOW_S,
                       around: Sequence[float] | None = None, span: tuple[float, float] = SPAN) -> float:
    """A run's seconds with the machine's slow drift taken out, everything nbguard adds kept.

    The run's time is the time outside the training loop (import, guard, discovery, the final save
    and the wait for it: all timed as they are) plus its steps. Each step (its safe point and any
    save stall included) counts as ``pace`` plus its excess over the median of the steps within
    ``window_s`` seconds of it: a step slowed by a save or by the writer beside it keeps its excess,
    while a minute in which the whole machine ran 10 % slower no longer counts. Two runs given the
    same ``pace`` (the plain side's median step) then differ by what the guarded side added. What
    this cannot see is a slowdown of every step alike, which is the safe point's cost per iteration
    (``benchmarks.safe_point_overhead``).

    With ``around`` (seconds from the loop's start), only steps whose middle lies from ``span[0]``
    seconds before to ``span[1]`` seconds after one of those moments keep their excess; the others
    count as ``pace`` exactly. Given a guarded run's save times for both runs of a pair, this drops
    the jitter of the minutes between saves, in which nbguard does nothing."""
    steps = run["step_s"]
    ends = list(itertools.accumulate(steps))
    middles = [end - step / 2 for end, step in zip(ends, steps, strict=True)]
    excess = 0.0
    lo = hi = 0
    for i, step in enumerate(steps):
        while middles[lo] < middles[i] - window_s:
            lo += 1
        while hi + 1 < len(steps) and middles[hi + 1] <= middles[i] + window_s:
            hi += 1
        if around is None or any(t - span[0] <= middles[i] <= t + span[1] for t in around):
            excess += step - statistics.median(steps[lo:hi + 1])
    return run["outside_loop_s"] + len(steps) * pace + excess


def lost_drift_free(plain: dict[str, Any], guarded: dict[str, Any], window_s: float = WINDOW_S,
                    around: Sequence[float] | None = None) -> float:
    """Lost throughput of a pair from ``drift_free_seconds``, both sides at the plain run's median
    step and, with ``around``, the same moments for both."""
    pace = statistics.median(plain["step_s"])
    return (drift_free_seconds(guarded, pace, window_s, around)
            / drift_free_seconds(plain, pace, window_s, around) - 1)


def save_moments(guarded: dict[str, Any]) -> list[float]:
    """Where a guarded run's saves began, in seconds from its loop's start, and the start itself
    (where the run prepares its staging memory in the background)."""
    return [0.0, *guarded["save_at"]]


def _in_loop(guarded: dict[str, Any]) -> int:
    """How many of a guarded run's saves began inside its training loop (not before or after it)."""
    loop_s = sum(guarded["step_s"])
    return sum(0 <= t <= loop_s for t in guarded["save_at"])


def _seconds(cadence: str) -> float:
    """A cadence such as "30s" or "5m" in seconds, read as nbguard reads ``every``."""
    from nbguard.training.options import parse_duration  # imports torch: only when a figure needs it

    return parse_duration(cadence)


def cadence_moments(cadence: str, run: dict[str, Any]) -> list[float]:
    """For a plain/plain pair: where a guarded run's saves would have begun."""
    every = _seconds(cadence)
    return [k * every for k in range(int(sum(run["step_s"]) // every) + 1)]


def _spread(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Median, lowest and highest lost throughput of the pairs: end to end, against each process's
    own reference steps, drift-free, and drift-free at saves."""
    out = {}
    for key in ("lost", "lost_vs_reference", "lost_drift_free", "lost_at_saves"):
        values = [r[key] for r in rounds]
        out.update({f"{key}_median": statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values)})
    return out


def side_by_side_cpus() -> tuple[int, int]:
    """Two CPUs this process may run on (the side-by-side layout needs two)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        raise SystemExit("the side-by-side layout runs both sides at once, one CPU each: this machine "
                         "offers fewer than two; use --layout sequential")
    return cpus[0], cpus[1]


def measure_side_by_side(cadence: str, seconds: float, pairs: int, null_pairs: int = 1, log: Any = print,
                         malloc: str = "pinned", warm_up: bool = True, calibrate_steps: int = 40) -> dict[str, Any]:
    """Plain and guarded runs at the same time, each pinned to a CPU of its own with one torch
    thread; the CPUs swap sides from pair to pair. The machine's drift (the sequential layout's
    ±4 % between processes a few minutes apart here) then meets both sides in the same seconds.
    The guarded process's background work (writer, hashing, direct I/O) runs on its own CPU, taken
    from its training alone: an upper bound of what two threads sharing two CPUs would lose.
    ``null_pairs`` first run plain beside plain: their spread is this layout's noise. ``warm_up``
    runs one plain process first and discards it (see ``measure``); ``calibrate_steps`` time the
    step that sets the number of steps per run."""
    cpus = side_by_side_cpus()
    scratch = tempfile.mkdtemp(prefix="nbguard-throughput-")
    try:
        step_s = _child("calibrate", scratch, calibrate_steps, cadence, malloc, cpu=cpus[0])["step_s"]
        steps = max(1, round(seconds / step_s))
        log(f"throughput @{cadence}, side by side on CPUs {cpus}: {steps} steps per run (~{step_s * 1e3:.0f} ms/step, "
            f"one thread), {null_pairs} plain/plain and {pairs} plain/guarded pair(s), malloc {malloc}")
        if warm_up:
            _child("plain", os.path.join(scratch, "warm-up"), max(1, steps // 6), cadence, malloc, cpu=cpus[0])
        rounds: list[dict[str, Any]] = []
        nulls: list[float] = []
        nulls_drift_free: list[float] = []
        nulls_at_saves: list[float] = []
        for index in range(null_pairs + pairs):
            null = index < null_pairs
            sides = ("plain", "plain") if null else ("plain", "guarded")
            order = cpus if index % 2 == 0 else cpus[::-1]
            running = []
            for side, (mode, cpu) in enumerate(zip(sides, order, strict=True)):
                folder = os.path.join(scratch, f"run-{index}-{side}")
                shutil.rmtree(folder, ignore_errors=True)
                running.append((mode, folder, _start(mode, folder, steps, cadence, malloc, cpu)))
            times = [_finish(mode, process) for mode, _, process in running]
            for _, folder, _ in running:
                shutil.rmtree(folder, ignore_errors=True)
            check_same_work(*times)
            lost = times[1]["seconds"] / times[0]["seconds"] - 1
            if null:
                nulls.append(lost)
                nulls_drift_free.append(lost_drift_free(times[0], times[1]))
                nulls_at_saves.append(lost_drift_free(times[0], times[1], around=cadence_moments(cadence, times[0])))
                log(f"  null pair {index}: plain {times[0]['seconds']:.1f} s on CPU {order[0]}, plain "
                    f"{times[1]['seconds']:.1f} s on CPU {order[1]} -> {lost:+.2%}; drift-free {nulls_drift_free[-1]:+.2%}; "
                    f"at saves {nulls_at_saves[-1]:+.2%}")
                continue
            _check_saved_in_loop(times[1], cadence, seconds)
            relative = [t["seconds"] / t["reference_s"] for t in times]
            rounds.append({"plain_s": times[0]["seconds"], "guarded_s": times[1]["seconds"], "lost": lost,
                           "lost_vs_reference": relative[1] / relative[0] - 1,
                           "lost_drift_free": lost_drift_free(times[0], times[1]),
                           "lost_at_saves": lost_drift_free(times[0], times[1], around=save_moments(times[1])),
                           "save_at": times[1]["save_at"], "saves_in_loop": _in_loop(times[1]),
                           "outside_loop_s": [t["outside_loop_s"] for t in times], "cpus": list(order),
                           "saves_kept": times[1]["saves_kept"], "ran_on": [t["cpus"] for t in times],
                           "threads": [t["threads"] for t in times], "reference_s": [t["reference_s"] for t in times],
                           "minor_faults": [t["minor_faults"] for t in times], "cpu_s": [t["cpu_s"] for t in times]})
            log(f"  pair {index - null_pairs}: plain {times[0]['seconds']:.1f} s on CPU {order[0]}, guarded "
                f"{times[1]['seconds']:.1f} s on CPU {order[1]} -> lost {lost:+.2%} (CPU {times[0]['cpu_s']:.0f} / "
                f"{times[1]['cpu_s']:.0f} s, {times[1]['saves_kept']} snapshot(s) kept)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"layout": "side-by-side", "cadence": cadence, "seconds": seconds, "steps": steps, "step_s": step_s,
            "malloc": malloc, "pairs": rounds, "null": nulls, "null_drift_free": nulls_drift_free,
            "null_at_saves": nulls_at_saves, **_spread(rounds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cadence", default="30s", help="the guarded run's --every (default 30s)")
    parser.add_argument("--seconds", type=float, default=120.0, help="length of each run (default 120)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--malloc", choices=("pinned", "default"), default="pinned",
                        help="glibc malloc thresholds of both sides (see PINNED_MALLOC); default: pinned")
    parser.add_argument("--layout", choices=("sequential", "side-by-side"), default="sequential",
                        help="sequential: A B / B A in turn, torch on every CPU; side-by-side: both at once, one CPU "
                             "each (see measure_side_by_side)")
    parser.add_argument("--null-pairs", type=int, default=1, help="plain/plain pairs run first (what the figures read "
                        "when nothing was added; default 1)")
    parser.add_argument("--target", type=float, default=None, help="limit for the median lost throughput, e.g. 0.02")
    parser.add_argument("--out", default=os.path.join(HERE, "benchmarks", "results"))
    args = parser.parse_args(argv)
    try:
        check_seconds(args.cadence, args.seconds)
    except ValueError as error:
        parser.error(str(error))
    load = os.getloadavg()[0]
    if args.layout == "side-by-side":
        result = measure_side_by_side(args.cadence, args.seconds, args.pairs, args.null_pairs, malloc=args.malloc)
    else:
        result = measure(args.cadence, args.seconds, args.pairs, malloc=args.malloc, null_pairs=args.null_pairs)
    result.update(load_start=load, load_end=os.getloadavg()[0],
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command="python -m benchmarks.throughput " + " ".join(argv if argv is not None else sys.argv[1:]))
    verdicts = {"lost": "", "lost_drift_free": "", "lost_at_saves": ""}
    if args.target is not None:
        verdicts = {k: " PASS" if result[f"{k}_median"] < args.target else " MISS" for k in verdicts}
        result["target"] = args.target
    null = (f"; plain/plain: {', '.join(f'{x:+.2%}' for x in result['null'])} end to end, "
            f"{', '.join(f'{x:+.2%}' for x in result['null_drift_free'])} drift-free, "
            f"{', '.join(f'{x:+.2%}' for x in result['null_at_saves'])} at saves" if result.get("null") else "")
    line = (f"lost throughput @{args.cadence} (measured, {args.layout}, {args.pairs} pair(s) of {args.seconds:g} s runs, "
            f"malloc {args.malloc}): end to end median {result['lost_median']:+.2%}, range {result['lost_min']:+.2%} .. "
            f"{result['lost_max']:+.2%}{verdicts['lost']}; drift-free median {result['lost_drift_free_median']:+.2%}, "
            f"range {result['lost_drift_free_min']:+.2%} .. {result['lost_drift_free_max']:+.2%}{verdicts['lost_drift_free']}; "
            f"at saves median {result['lost_at_saves_median']:+.2%}, range {result['lost_at_saves_min']:+.2%} .. "
            f"{result['lost_at_saves_max']:+.2%}{verdicts['lost_at_saves']}{null}")
    print(line)
    os.makedirs(args.out, exist_ok=True)
    layout = "-side-by-side" if args.layout == "side-by-side" else ""
    stem = os.path.join(args.out, f"throughput-{args.cadence}{layout}-{time.strftime('%Y%m%d-%H%M%S')}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# {line}\n\n`{result['command']}` · {result['date']} · load {load:.1f} → {result['load_end']:.1f}\n\n"
                "| pair | plain s | guarded s | lost end to end | drift-free | drift-free at saves | saves (in the loop) "
                "| outside the loop s plain / guarded | snapshots kept | minor faults plain / guarded | CPU s plain / guarded |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|\n")
        for i, r in enumerate(result["pairs"]):
            f.write(f"| {i} | {r['plain_s']:.1f} | {r['guarded_s']:.1f} | {r['lost']:+.2%} | {r['lost_drift_free']:+.2%} | "
                    f"{r['lost_at_saves']:+.2%} | {len(r['save_at'])} ({r['saves_in_loop']}) | "
                    f"{r['outside_loop_s'][0]:.2f} / {r['outside_loop_s'][1]:.2f} | {r['saves_kept']} | "
                    f"{r['minor_faults'][0]} / {r['minor_faults'][1]} | {r['cpu_s'][0]:.0f} / {r['cpu_s'][1]:.0f} |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
