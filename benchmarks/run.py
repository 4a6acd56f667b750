"""nbguard's performance benchmark: floors, nbguard, peers, frozen backbone, training overhead, memory.

    python -m benchmarks.run                      # default: ~0.75 GiB of state, a few minutes
    python -m benchmarks.run --size-gib 3         # the headline size (needs ~12 GiB of RAM)
    python -m benchmarks.run --only floors,nbguard --repeats 5

Everything is measured in one process run, on the same state, medians of ``--repeats`` repeats.
Results: a table on stdout, ``<out>/latest.json`` and ``<out>/latest.md`` (plus a copy named after
the size, e.g. ``size-0.75gib.json``). See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from nbguard.stores.directio import PIECE

from . import floors as fl
from . import peers
from .floors import GiB, IoDelta, MiB, PeakRss, advance, evict_tree, rehome, state_tensors, summary, touch

# what a restore into the live state may add to peak RSS: its read window (a piece hashed, the next
# read in) and 1 MiB for the interpreter's own objects
RESTORE_MEMORY_LIMIT = 2 * PIECE + MiB
# guarded runs per round whose first save is timed against their own next save (each pair's ratio;
# the target pools them over the rounds: with three a round, two next saves in a fast minute at 3 GiB
# decided a round in stop 40)
GUARDED_RUNS_PER_ROUND = 5
# steady saves per round (each with its floors next to it); the round reports their medians
STEADY_SAVES_PER_ROUND = 3
# restores (and resumes) per round whose first save is timed against the same guard's next save: a
# 0.75 GiB stall is ~40 ms, and one save in five here takes 1.4-2.8x that for reasons outside it (the
# same copy_ of the same bytes, profiled), so the round takes the medians of three pairs
RESTORES_PER_ROUND = 3
# retention for the guards of a round: more than it saves, so no deletion runs inside a timed save (a
# save waits for the previous save's clean-up; unlinking a 0.75 GiB blob takes ~90 ms on ext4 here);
# _keep_newest frees the disk between restores instead, untimed
NO_DELETION = 100
# paired saves of the frozen-backbone case (full state, then the trainable part alone): the two stalls
# differ by ~0.3 ms (the frozen tensors' discovery) on ~3.5 ms, and one save in five here swings by
# a millisecond or more, so the target takes the median of this many paired ratios (11 gave 1.07-1.12
# from run to run, 30 gave 1.06)
FROZEN_PAIRS = 31

CASES = ("floors", "nbguard", "torch_save", "dcp", "torchsnapshot", "frozen", "training", "throughput")


def log(message: str) -> None:
    print(message, flush=True)


# -- the benchmark state -----------------------------------------------------------------------------
def build_state(size_gib: float, seed: int = 0) -> tuple[torch.nn.Sequential, torch.optim.Optimizer]:
    """A stack of nn.Linear layers with Adam (exp_avg, exp_avg_sq populated by one step):
    parameters are a third of ``size_gib``."""
    torch.manual_seed(seed)
    param_bytes = size_gib * GiB / 3
    width = 4096
    per_layer = (width * width + width) * 4
    layers = round(param_bytes / per_layer)
    if layers < 2:
        layers = 2
        width = max(64, int(math.sqrt(param_bytes / 4 / layers)) // 64 * 64)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).square().mean().backward()
    opt.step()
    for p in model.parameters():  # grads are not part of the state: free them
        p.grad = None
    return model, opt


def nbytes_of(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _fresh(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    return path


# -- nbguard -----------------------------------------------------------------------------------------
def snapshot_files(folder: str) -> list[str]:
    """The blob files the latest snapshot in ``folder`` keeps its tensors in (what a restore reads)."""
    import nbguard
    from nbguard.format.blobfile import blob_path

    snap = nbguard.load(folder, "latest")
    names = dict.fromkeys(spec["blob"] for spec in snap.manifest["storages"].values())
    root = snap.store.root  # type: ignore[attr-defined]  # a LocalStore: the benchmark saves to a folder
    return [os.path.join(root, blob_path(name)) for name in names]


def _stats(guard: Any) -> Any:
    """The stats of ``guard``'s last save (there is one: it was just waited for)."""
    stats = guard.last_stats
    assert stats is not None, "no save has finished on this guard"
    return stats


def staging_buffers(guard: Any) -> list[torch.Tensor]:
    """The guard's staging buffers (one per storage; the state here has no shared storages)."""
    return list(guard._staging._buffers.values())


def _timed_save(guard: Any, state: dict[str, Any], label: str = "save stall",
                counters: dict[str, Any] | None = None) -> tuple[float, float]:
    """Save ``state`` once: (stall, until durable) in seconds; raises what the save raised. The stall
    is logged in ``fl.REPORTING`` under ``label``; ``counters``, where given, gets how much each of
    ``_machine_counters`` grew over the stall (read right outside it: a reading takes ~1 ms)."""
    before = _machine_counters() if counters is not None else {}
    with fl.REPORTING.timed(label) as watch:
        handle = guard.save(state)
    if counters is not None:
        counters.update({k: v - before.get(k, 0.0) for k, v in _machine_counters().items()})
    handle.wait()
    durable = time.perf_counter() - watch.started
    handle.result()
    return watch.seconds, durable


def _sched_ms(path: str) -> float | None:
    """A task's CPU time in ms, with microsecond resolution (``se.sum_exec_runtime`` of its ``sched``
    file); None where the kernel does not show it."""
    with contextlib.suppress(OSError, ValueError), open(path) as f:
        for line in f:
            if line.startswith("se.sum_exec_runtime"):
                return float(line.split(":")[1])
    return None


def _thread_cpu_ms() -> dict[str, float]:
    """CPU time in ms of each of this process's threads, summed by Python thread name (torch's own
    worker threads, which Python does not know, as "native")."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            ms = _sched_ms(f"/proc/self/task/{tid}/sched")
            if ms is not None:
                name = names.get(int(tid), "native")
                out[name] = out.get(name, 0.0) + ms
    return out


def _psi_some_ms(resource_name: str) -> float:
    """Total time (ms) some task waited for ``resource_name`` (cpu, memory, io), from PSI; 0 without it."""
    with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/pressure/{resource_name}") as f:
        return int(f.readline().rsplit("total=", 1)[1]) / 1000
    return 0.0


class _GcTime:
    """Time spent in Python's cyclic garbage collector, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.ms = 0.0
        self.collections = 0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self._started) * 1e3
            self.collections += 1


_GC_TIME = _GcTime()
gc.callbacks.append(_GC_TIME)


def _machine_counters() -> dict[str, float]:
    """What else took the CPU, as counters read before and after a save: the guest's steal time (ms,
    all CPUs, ``/proc/stat``), every CPU's busy time less this process's (``others_ms``, ticks), this
    process's involuntary context switches and minor page faults, the CPU time of the kernel's DAMON threads (``kdamond``,
    which runs a page-out scheme in these VMs), PSI's "some" stall time for cpu and memory, the time in
    Python's garbage collector, and each of this process's threads' CPU time (``thread_ms:<name>``).
    Missing ones read 0."""
    ticks = 1000 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 10.0
    out = {"steal_ms": 0.0, "others_ms": 0.0, "involuntary_switches": 0.0, "minor_faults": 0.0, "kdamond_ms": 0.0,
           "psi_cpu_ms": _psi_some_ms("cpu"), "psi_memory_ms": _psi_some_ms("memory"),
           "gc_ms": _GC_TIME.ms, "gc_collections": float(_GC_TIME.collections)}
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        out["steal_ms"] = fields[7] * ticks
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
        out["others_ms"] = (busy - fields[7] - int(own[11]) - int(own[12])) * ticks
    except (OSError, IndexError, ValueError):
        pass
    try:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        out["involuntary_switches"], out["minor_faults"] = float(usage.ru_nivcsw), float(usage.ru_minflt)
    except (ImportError, OSError):
        pass
    try:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
                    fields_ = f.read().rsplit(")", 1)
                    if "(kdamond" in fields_[0]:
                        rest = fields_[1].split()
                        out["kdamond_ms"] += (int(rest[11]) + int(rest[12])) * ticks
    except OSError:
        pass
    out.update({f"thread_ms:{name}": ms for name, ms in _thread_cpu_ms().items()})
    return out


class SavePhases:
    """Where a save's stall went, for the saves after a restore and after a resume (a diagnostic: in
    stop 39 the first save after a restore took 2-3x the next one in some runs, with no page fault and
    no reporting pass met to explain it). Per save: the wait for the previous save, the check for
    deleted blobs, the capture, the wait for the staging prefault, the rest of staging (grouping,
    change detection) and the copies, with how many staging buffers the copies had to allocate, and
    the seconds since the restore returned; and what else took the CPU meanwhile (``_machine_counters``:
    stop 40's slowest first saves after a restore were slow in every phase at once)."""

    PHASES = ("flush", "drop_missing", "capture", "wait_prefault", "stage", "copy")

    def __init__(self) -> None:
        self.samples: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def timed(self, guard: Any, label: str, restored_at: float) -> Iterator[dict[str, Any]]:
        from nbguard.engine import guard as guard_module

        sample: dict[str, Any] = {"label": label, "since_restore": time.perf_counter() - restored_at,
                                  "fresh_buffers": 0, **dict.fromkeys(self.PHASES, 0.0)}
        staging = guard._staging

        def timing(owner: Any, name: str, phase: str) -> Any:
            original = getattr(owner, name)

            def timed_call(*args: Any, **kwargs: Any) -> Any:
                if phase == "copy" and staging._reusable(args[0]) is None:
                    sample["fresh_buffers"] += 1
                t0 = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    sample[phase] += time.perf_counter() - t0
            setattr(owner, name, timed_call)
            return original

        patched = [(guard._writer, "flush", "flush"), (staging, "drop_missing", "drop_missing"),
                   (staging, "wait_prefault", "wait_prefault"), (staging, "stage", "stage"), (staging, "_copy", "copy")]
        for owner, name, phase in patched:
            timing(owner, name, phase)
        capture = timing(guard_module, "capture", "capture")
        try:
            yield sample
        finally:
            for owner, name, _ in patched:
                delattr(owner, name)  # the instance attribute: the class's method shows again
            guard_module.capture = capture
            sample["stage"] -= sample["wait_prefault"] + sample["copy"]  # grouping and change detection
            if "stall" in sample:  # set by the caller once the save returned
                self.samples.append(sample)

    def summary(self) -> dict[str, Any]:
        """Per label: the median of each phase, the slowest and the fastest save's phases and
        counters, and every sample."""
        out: dict[str, Any] = {}
        for label in dict.fromkeys(s["label"] for s in self.samples):
            mine = [s for s in self.samples if s["label"] == label]
            out[label] = {"n": len(mine),
                          "median": {k: statistics.median(s[k] for s in mine) for k in ("stall", *self.PHASES)},
                          "slowest": max(mine, key=lambda s: s["stall"]),
                          "fastest": min(mine, key=lambda s: s["stall"]), "samples": mine}
        return out


SAVE_PHASES = SavePhases()


def _first_and_next(guard: Any, model, opt, state: dict[str, Any], label: str,
                    restored_at: float) -> tuple[float, float]:
    """The stalls of two saves by ``guard``, each after every tensor changed (a training step); each
    logged in ``fl.REPORTING`` as "``label``: first/next save" (whether a reporting pass met it), and
    its phases in ``SAVE_PHASES``."""
    stalls = []
    for which in ("first", "next"):
        advance(model, opt)
        fl.settle()
        name = f"{label}: {which} save"
        with SAVE_PHASES.timed(guard, name, restored_at) as sample:
            sample["stall"] = _timed_save(guard, state, f"{name} (stall)", counters=sample)[0]
        stalls.append(sample["stall"])
    return stalls[0], stalls[1]


def _keep_newest(folder: str) -> None:
    """Delete every snapshot in ``folder`` but the newest (between timed parts: a 3 GiB round saves
    ~17 snapshots)."""
    import nbguard

    catalog = nbguard.Catalog(folder)
    for info in catalog.snapshots()[1:]:  # newest first
        catalog.delete(info.id, info.run)


def _medians_of(pairs: list[tuple[float, float]], first: str, next_: str) -> dict[str, Any]:
    """The round's figures from several (first save, next save) pairs: the median of each, and each
    pair's ratio (``<first>_ratios``; the target pools them over the rounds, see ``pooled_ratio``)."""
    return {first: statistics.median(p[0] for p in pairs), next_: statistics.median(p[1] for p in pairs),
            f"{first}_ratios": [p[0] / p[1] for p in pairs]}


def nbguard_once(model, opt, folder: str, notes: list[str], paired: fl.PairedFloors) -> dict[str, Any]:
    """One repeat: a fresh Guard in a fresh folder; first (full) save, an unchanged save, a full save
    with reused buffers after every tensor changed, then cold restores (all, and the model only).

    The steady save and the full restore each get their floors measured right next to them, on the
    same bytes (``PairedFloors``): copy into preallocated memory and write+fsync for the save, a cold
    read of the snapshot's own files for the restore."""
    import nbguard

    _fresh(folder)
    guard = nbguard.Guard(folder, run="bench", keep=NO_DELETION, report=notes.append)  # no deletion inside a timed save
    state = {"model": model, "opt": opt}
    out: dict[str, Any] = {}

    fl.settle()
    with PeakRss() as mem:
        out["first_stall"], out["first_durable"] = _timed_save(guard, state)
    st = _stats(guard)
    out.update(first_written=st.written_bytes, first_staged=st.staged_bytes, first_peak_rss_increase=mem.increase,
               first_durable_after=st.durable_after, first_streaming=st.streaming)

    out["unchanged_stall"], out["unchanged_durable"] = _timed_save(guard, state)
    st = _stats(guard)
    out.update(unchanged_written=st.written_bytes, unchanged_staged=st.staged_bytes, unchanged_reused=st.reused_bytes)

    # Steady saves, each after every tensor changed, each with its floors measured right before or
    # after it (alternating): the median of STEADY_SAVES_PER_ROUND of each, since a 3 GiB copy swings
    # 0.14-0.43 s from one second to the next on these VMs.
    # The copy floor goes into the guard's own staging buffers, the pages the save copies into: on these
    # VMs a fresh allocation copies at one of two speeds (22 or 36 ms for 0.75 GiB, the same bytes,
    # each allocation keeping its speed through a round's saves), so a floor into other memory measured which
    # allocation won (stop 38: 1.63 = 36 ms against 22 ms, the same copy_). The floor into memory of
    # its own is kept as steady_stall_floor_own.
    floors_first = paired.next_round()
    samples: dict[str, list[float]] = {key: [] for key in ("steady_stall", "steady_durable", "steady_stall_floor",
                                                           "steady_stall_floor_own", "steady_durable_floor")}
    peaks: list[int] = []

    def record_floors(tensors: list[torch.Tensor], staging: list[torch.Tensor]) -> None:
        samples["steady_stall_floor"].append(paired.copy(tensors, into=staging))
        samples["steady_stall_floor_own"].append(paired.copy(tensors))
        samples["steady_durable_floor"].append(paired.write_fsync(f"{folder}-floor.bin", tensors))

    for k in range(STEADY_SAVES_PER_ROUND):
        advance(model, opt)
        tensors = state_tensors(model, opt)
        floors_before = floors_first == (k % 2 == 0)
        if floors_before:
            record_floors(tensors, staging_buffers(guard))
        fl.settle()
        with PeakRss() as mem:
            stall, durable = _timed_save(guard, state)
        samples["steady_stall"].append(stall)
        samples["steady_durable"].append(durable)
        if mem.increase is not None:
            peaks.append(mem.increase)
        if not floors_before:
            record_floors(tensors, staging_buffers(guard))
    out.update({key: statistics.median(values) for key, values in samples.items()})
    st = _stats(guard)
    out.update(steady_written=st.written_bytes, steady_staged=st.staged_bytes, steady_peak_rss_increase=max(peaks, default=None),
               steady_durable_after=st.durable_after)
    guard.close()
    del guard
    gc.collect()

    # the first save of a guarded run: the run prepares staging memory as it starts (in the
    # background, beside the first iterations); by the first timer save it is warm. Each guarded
    # run's first save is compared with that same run's next (steady) save, seconds later: the copy
    # of a 3 GiB state swings 0.2-0.6 s over minutes on these VMs, which a comparison with another
    # guard's save, made earlier in the round, would measure instead.
    pairs: list[tuple[float, float]] = []
    prepares: list[float] = []
    for _ in range(GUARDED_RUNS_PER_ROUND):
        prepared = nbguard.Guard(_fresh(folder + "-prepared"), run="bench", keep=3, report=notes.append)
        t0 = time.perf_counter()
        prepared.prepare(state, wait=True)
        prepares.append(time.perf_counter() - t0)
        stalls = []
        for _ in ("first", "next"):
            advance(model, opt)  # the training steps before each save write every tensor
            fl.settle()
            stalls.append(_timed_save(prepared, state)[0])
        pairs.append((stalls[0], stalls[1]))
        prepared.close()
        shutil.rmtree(folder + "-prepared", ignore_errors=True)
        del prepared
        gc.collect()
    out["prepare_s"] = statistics.median(prepares)
    out.update(_medians_of(pairs, "first_prepared_stall", "prepared_steady_stall"))

    # cold restores of everything into the live model + optimizer, through a guard whose staging
    # memory is ready (Guard.restore, %nbguard restore, and %%checkpointed once its prepare finished):
    # read into the staging buffers, then the buffers and the live storages exchange memory. Each is
    # timed with a cold read of the same files right next to it (before or after, alternating), and
    # the round reports the medians: one restore a round let a single slow read decide (a cold read
    # here took 0.2-1.0 s for the same 0.75 GiB within minutes). Each restore's first save is compared
    # with the same guard's next save, seconds later, as the first save of a guarded run is.
    restores: list[float] = []
    floors: list[float] = []
    restore_peaks: list[int | None] = []
    pairs = []
    for i in range(RESTORES_PER_ROUND):
        restorer = nbguard.Guard(folder, run="bench", keep=NO_DELETION, report=notes.append)
        restorer.prepare(state, wait=True)
        files = snapshot_files(folder)
        floor_before = floors_first == (i % 2 == 0)
        if floor_before:
            floor, floor_read = paired.read_cold(files)
        fl.wait_for_reporting_quiet()
        evict_tree(folder)
        with IoDelta() as io, PeakRss() as mem:
            with fl.REPORTING.timed("restore") as watch:
                restorer.restore(state)
                touch(model, opt)
            restores.append(watch.seconds)
            restored_at = time.perf_counter()
        if not floor_before:
            floor, floor_read = paired.read_cold(files)
        floors.append(floor)
        if i == 0:
            out.update(restore_read_bytes=io.read_bytes, restore_floor_read_bytes=floor_read)
        restore_peaks.append(mem.increase)
        pairs.append(_first_and_next(restorer, model, opt, state, "after a restore", restored_at))
        restorer.close()
        del restorer
        gc.collect()
        _keep_newest(folder)
    known_peaks = [p for p in restore_peaks if p is not None]
    out.update(restore=statistics.median(restores), restore_floor=statistics.median(floors),
               restore_samples=restores, restore_floor_samples=floors,
               restore_peak_rss_increase=max(known_peaks) if known_peaks else None)
    out.update(_medians_of(pairs, "after_restore_stall", "after_restore_next_stall"))

    # the same without a guard (a script's nbguard.load(...).restore): hashed, then copied in
    evict_tree(folder)
    with IoDelta() as io, PeakRss() as mem:
        t0 = time.perf_counter()
        snap = nbguard.load(folder, "latest")
        snap.restore(state)
        touch(model, opt)
        out["restore_plain"] = time.perf_counter() - t0
    out.update(restore_plain_read_bytes=io.read_bytes, restore_plain_peak_rss_increase=mem.increase)
    del snap
    gc.collect()
    # the first in-place update after the restore (optimizer state may sit on a copy-on-write map)
    t0 = time.perf_counter()
    advance(model, opt)
    out["first_update_after_restore"] = time.perf_counter() - t0
    rehome(opt)
    gc.collect()
    t0 = time.perf_counter()
    advance(model, opt)
    out["update_normal"] = time.perf_counter() - t0

    # cold restore of the model's weights only
    evict_tree(folder)
    with IoDelta() as io:
        t0 = time.perf_counter()
        snap = nbguard.load(folder, "latest")
        snap.restore({"model": model}, only=["model"], rng=False)
        out["restore_model_only"] = time.perf_counter() - t0
    out["restore_model_only_read_bytes"] = io.read_bytes
    del snap
    gc.collect()

    # a resume as a new process meets it: the weights in memory just allocated, the optimizer without
    # state (Adam creates it at its first step; here the restore does), the guard's prepare started in
    # the background right before the restore (as %%checkpointed does). Its first save is compared
    # with its next, as the first save of a guarded run is.
    pairs, resumes = [], []
    for _ in range(RESTORES_PER_ROUND):
        with torch.no_grad():
            for p in model.parameters():
                p.data = torch.empty_like(p)
        opt.state.clear()
        gc.collect()
        resumer = nbguard.Guard(folder, run="bench", keep=NO_DELETION, report=notes.append)
        evict_tree(folder)
        t0 = time.perf_counter()
        resumer.prepare(state)
        resumer.restore(state)
        restored_at = time.perf_counter()
        resumes.append(restored_at - t0)
        pairs.append(_first_and_next(resumer, model, opt, state, "after a resume", restored_at))
        resumer.close()
        del resumer
        gc.collect()
        _keep_newest(folder)
    out["resume_restore"] = statistics.median(resumes)
    out.update(_medians_of(pairs, "resume_first_stall", "resume_next_stall"))
    shutil.rmtree(folder, ignore_errors=True)
    return out


class _NoSettle:
    """Warm-ups (small states, code paths only) skip the settling pause."""

    def __enter__(self) -> None:
        self.saved, fl.SETTLE_MODE = fl.SETTLE_MODE, "none"

    def __exit__(self, *exc: object) -> None:
        fl.SETTLE_MODE = self.saved


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = dict.fromkeys(k for r in runs for k in r)
    out: dict[str, Any] = {}
    for k in keys:
        vals = [r[k] for r in runs if k in r]
        if all(isinstance(v, bool) for v in vals):
            out[k] = any(vals)
        elif all(isinstance(v, (int, float)) and v is not None for v in vals):
            out[k] = summary(vals)
        elif all(isinstance(v, list) for v in vals):
            out[k] = vals  # each round's samples behind its median, as measured
    return out


class DcpReusedStager:
    """DCP async_save with one DefaultStager kept between saves (its staging copies are reused);
    warmed up at full size so that every timed save reuses them."""

    def __init__(self) -> None:
        self.stager = peers.dcp_reused_stager()
        self.warm = False

    def once(self, model, opt, folder: str) -> dict[str, Any]:
        if not self.warm:
            with _NoSettle():
                peers.dcp_async_once(model, opt, _fresh(folder + "-fill"), stager=self.stager)
            self.warm = True
        advance(model, opt)
        fl.settle()
        return peers.dcp_async_once(model, opt, folder, stager=self.stager)

    def warmup(self, model, opt, folder: str) -> None:
        pass  # a small state would allocate other staging copies: the first full-size call warms up

    def close(self) -> None:
        self.stager.close()


def run_rounds(cases: list[tuple[str, Any]], model, opt, scratch: str, repeats: int) -> dict[str, dict[str, Any]]:
    """Warm every case up on a small state, then run ``repeats`` rounds; each round runs every case
    once, in an order rotated from round to round, so the drift of a shared machine (other jobs,
    memory state) spreads over all the tools alike. Medians per case."""
    if not cases:  # e.g. --only frozen: the cases that run outside the rounds
        return {}
    small_model, small_opt = build_state(0.01, seed=1)
    with _NoSettle():
        for name, fn in cases:
            warm = getattr(fn, "__self__", None)
            if isinstance(warm, DcpReusedStager):
                continue
            fn(small_model, small_opt, _fresh(os.path.join(scratch, f"{name}-warmup")))
            shutil.rmtree(os.path.join(scratch, f"{name}-warmup"), ignore_errors=True)
    del small_model, small_opt
    gc.collect()
    fl.REPORTING.samples.clear()  # the diagnostics are about the full-size state: not the warm-ups' samples
    SAVE_PHASES.samples.clear()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in cases}
    for i in range(repeats):
        shift = i % len(cases)
        for name, fn in cases[shift:] + cases[:shift]:
            folder = _fresh(os.path.join(scratch, f"{name}-{i}"))
            r = fn(model, opt, folder)
            shutil.rmtree(folder, ignore_errors=True)
            rehome(opt, model)
            gc.collect()
            runs[name].append(r)
            log(f"round {i} {name}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float) and not isinstance(v, bool)))
    return {name: _aggregate(rs) for name, rs in runs.items()}


# -- frozen backbone ---------------------------------------------------------------------------------
def run_frozen(param_bytes: float, scratch: str, repeats: int, notes: list[str]) -> dict[str, Any]:
    """95% of the parameters frozen (not in the optimizer), a 5% trainable head. The frozen backbone
    has BatchNorm layers in train mode: their running statistics change at every step although no
    weight of theirs does (native kernels write them without bumping version counters)."""
    import nbguard

    layers_n = 20
    width = max(64, int(math.sqrt(param_bytes / 4 / layers_n)) // 64 * 64)
    torch.manual_seed(2)
    layers = [torch.nn.Linear(width, width) for _ in range(layers_n)]
    norms = [torch.nn.BatchNorm1d(width) for _ in range(layers_n - 1)]
    model = torch.nn.Sequential(*[m for pair in zip(layers[:-1], norms, strict=True) for m in pair], layers[-1])
    model.train()
    head = layers[-1]
    for layer in [*layers[:-1], *norms]:
        layer.requires_grad_(False)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    x = torch.randn(8, width)

    def train_step() -> None:
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_step()
    total_params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in head.parameters()]
    trainable_bytes = nbytes_of(trainable) + nbytes_of(model.buffers()) + nbytes_of(
        v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    state_bytes = nbytes_of(model.state_dict().values()) + trainable_bytes - nbytes_of(trainable) - nbytes_of(model.buffers())
    log(f"frozen backbone: {layers_n} x Linear({width}) with BatchNorm1d in train mode, {total_params / 1e6:.0f} M params, "
        f"{sum(p.numel() for p in trainable) / total_params:.1%} trainable; state {state_bytes / MiB:.0f} MiB, "
        f"trainable part {trainable_bytes / MiB:.1f} MiB")

    full_dir = _fresh(os.path.join(scratch, "frozen-full"))
    ref_dir = _fresh(os.path.join(scratch, "frozen-ref"))
    guard = nbguard.Guard(full_dir, run="frozen", keep=2, report=notes.append)
    ref = nbguard.Guard(ref_dir, run="ref", keep=2, report=notes.append)
    full_state = {"model": model, "opt": opt}
    ref_state = {"head": head, "opt": opt, "norms": torch.nn.ModuleList(norms)}  # what changes
    t0 = time.perf_counter()
    guard.save(full_state, wait=True)
    durable, stats = time.perf_counter() - t0, _stats(guard)
    first = {"durable": durable, "written": stats.written_bytes, "stall": stats.stall}
    ref.save(ref_state, wait=True)

    rows: dict[str, list[float]] = {"stall": [], "durable": [], "written": [], "ref_stall": [], "ref_durable": [], "ref_written": []}
    pairs = (("", guard, full_state), ("ref_", ref, ref_state))
    for i in range(repeats + 1):  # the first round is a warm-up
        for which, g, st in (pairs if i % 2 else pairs[::-1]):
            train_step()
            gc.collect()
            stall, durable = _timed_save(g, st)
            if i:
                rows[which + "stall"].append(stall)
                rows[which + "durable"].append(durable)
                rows[which + "written"].append(_stats(g).written_bytes)
    ref.close()

    # a write through .data on a frozen backbone parameter (behind its version counter), then a
    # snapshot: the writer's check finds it, and wait=True retakes the snapshot at once
    target = layers[0].weight
    target.data.add_(1)
    t0 = time.perf_counter()
    guard.save(full_state, wait=True).result()
    data_stall = time.perf_counter() - t0
    data_written = _stats(guard).written_bytes
    guard.close()
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    nbguard.load(full_dir, "latest").restore({"model": fresh}, only=["model"], rng=False)
    restored_ok = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    detected = restored_ok and data_written >= target.numel() * target.element_size()
    log(f"frozen backbone: change through .data {'DETECTED' if detected else 'NOT DETECTED'} "
        f"(third snapshot wrote {data_written / MiB:.1f} MiB; restored model equals live: {restored_ok})")
    del fresh
    shutil.rmtree(full_dir, ignore_errors=True)
    shutil.rmtree(ref_dir, ignore_errors=True)

    out: dict[str, Any] = {k: summary(v) for k, v in rows.items()}
    med = {k: statistics.median(v) for k, v in rows.items()}
    out.update(
        width=width, layers=layers_n, params=total_params, state_bytes=state_bytes, trainable_bytes=trainable_bytes,
        first=first, data_change_detected=detected, data_change_restored_equal=restored_ok,
        data_change_written=data_written, data_change_stall=data_stall,
        stall_ratio=statistics.median(a / b for a, b in zip(rows["stall"], rows["ref_stall"], strict=True)),
        stall_ratio_of_medians=med["stall"] / med["ref_stall"],
        bytes_ratio=med["written"] / trainable_bytes,
        bytes_ratio_vs_ref_written=med["written"] / med["ref_written"],
    )
    return out


# -- machine and reporting ---------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    info: dict[str, Any] = {
        "platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / GiB, 1),
        "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import nbguard

        info["nbguard"] = nbguard.__version__
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                            text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "nbguard"], cwd=here, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        info["nbguard_tree_dirty"] = bool(dirty)
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


def _med(d: dict | None, key: str) -> float | None:
    if not d or key not in d:
        return None
    v = d[key]
    return v["median"] if isinstance(v, dict) else v


def per_round(a: dict | None, a_key: str, b: dict | None, b_key: str) -> float | None:
    """The median over rounds of a[a_key] / b[b_key], each ratio taken within one round (the two were
    measured minutes apart at most: the drift of a shared machine cancels); the ratio of the medians
    where the rounds do not line up."""
    va = ((a or {}).get(a_key) or {}).get("values") or []
    vb = ((b or {}).get(b_key) or {}).get("values") or []
    if va and len(va) == len(vb) and all(vb):
        return statistics.median(x / y for x, y in zip(va, vb, strict=True))
    ma, mb = _med(a, a_key), _med(b, b_key)
    return ma / mb if ma is not None and mb else None


def _faster_write_floor(floors: dict | None) -> dict | None:
    """The floors case's faster durable write of each round, buffered (write+fsync) or O_DIRECT, as a
    figure ``write`` with per-round ``values``; None where either is missing."""
    buffered = ((floors or {}).get("write_fsync") or {}).get("values") or []
    direct = ((floors or {}).get("write_direct") or {}).get("values") or []
    if not buffered or len(buffered) != len(direct):
        return None
    values = [min(b, d) for b, d in zip(buffered, direct, strict=True)]
    return {"write": {"values": values, "median": statistics.median(values)}}


def build_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, as (figure, limit, ratio, PASS/MISS). A ratio of two figures measured in
    the same rounds is the median of the per-round ratios (``per_round``); the three floor targets use
    the floors measured right next to the save and the restore (``fl.PairedFloors``), and show the ratio
    to the floors case of the round as info."""
    f, n, p, fr, tr = r.get("floors"), r.get("nbguard"), r.get("peers", {}), r.get("frozen"), r.get("training")
    targets: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, detail: str, kind: str = "le") -> None:
        if value is None:
            targets.append({"target": name, "value": None, "limit": limit, "status": "n/a", "detail": detail})
            return
        ok = value <= limit if kind == "le" else value < limit
        targets.append({"target": name, "value": value, "limit": limit, "status": "PASS" if ok else "MISS",
                        "detail": detail})

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def best(*vals: float | None) -> float | None:
        present = [v for v in vals if v is not None]
        return min(present) if present else None

    def pooled_ratio(first: str, next_: str) -> float | None:
        """A first save against the same guard's next, seconds later: the median of every pair's ratio,
        all rounds pooled (a round's two medians came from different pairs: at 3 GiB a copy swings
        0.09-0.25 s minute to minute here, and two of a round's three next saves landing in a fast
        minute failed stop 40's run 2 with 1.51, no first save slower than the steady saves).
        Results without the pairs (before stop 41) fall back to the per-round ratio of the medians."""
        rounds = (n or {}).get(f"{first}_ratios")
        if rounds:
            return statistics.median(r for pairs in rounds for r in pairs)
        return per_round(n, first, n, next_)

    def next_to(key: str, floor_key: str, case_floor_key: str) -> float | None:
        """The ratio to the floor measured next to it; to the floors case where that is missing."""
        if n and floor_key in n:
            return per_round(n, key, n, floor_key)
        return per_round(n, key, f, case_floor_key)

    add("stall ≤ 1.3× preallocated-copy floor (steady save, buffers reused)",
        next_to("steady_stall", "steady_stall_floor", "copy_prealloc"), 1.3,
        "nbguard steady-state full save stall / copy_ of the same tensors into the same (the guard's staging) "
        "memory, next to it")
    add("stall ≤ 1.3× preallocated-copy floor into memory of its own (info)",
        next_to("steady_stall", "steady_stall_floor_own", "copy_prealloc"), 1.3,
        "the same floor copying into the floors' own buffer, allocated once per run (the target until stop 37)")
    add("stall ≤ 1.3× preallocated-copy floor of the floors case (info)", per_round(n, "steady_stall", f, "copy_prealloc"),
        1.3, "the same against the floors case of each round (up to a minute away)")
    add("first save without Guard.prepare ≤ 1.3× the clone floor (info)", per_round(n, "first_stall", f, "clone"),
        1.3, "fresh staging buffers, faulted in by the copy: against clone() of the same tensors into fresh memory")
    dcp_async = best(per_round(n, "steady_stall", p.get("dcp_async"), "stall"),
                     per_round(n, "steady_stall", p.get("dcp_async_reused_stager"), "stall"))
    add("stall < DCP async_save stall (best DCP variant)", dcp_async, 1.0,
        "nbguard steady stall / DCP async_save's (default stager, reused stager: the lower ratio)", kind="lt")
    add("first-save stall < DCP async_save stall (default stager)",
        per_round(n, "first_prepared_stall", p.get("dcp_async"), "stall"), 1.0,
        "the first save of a session as it comes: a guarded run (%%checkpointed, @checkpointed, or a Guard after "
        "guard.prepare(state)) has its staging ready; DCP's default stager allocates fresh memory at every call",
        kind="lt")
    add("first save without Guard.prepare < DCP async_save stall (default stager, info)",
        per_round(n, "first_stall", p.get("dcp_async"), "stall"), 1.0,
        "both copy into fresh memory, so both pay the same page faults (see the clone-floor row)", kind="lt")
    add("first save of a guarded run ≤ 1.3× the same run's steady save stall",
        pooled_ratio("first_prepared_stall", "prepared_steady_stall"), 1.3,
        "staging memory prepared in the background as the run starts (Guard.prepare), as %%checkpointed does; "
        "its next save, after every tensor changed, is the steady one")
    add("first save of a guarded run ≤ 1.3× the steady save of the round's first guard (info)",
        per_round(n, "first_prepared_stall", n, "steady_stall"), 1.3,
        "another guard's steady save, made earlier in the round (the target's comparison until stop 28)")
    add("until durable ≤ 1.3× write+fsync floor (steady save)",
        next_to("steady_durable", "steady_durable_floor", "write_fsync"), 1.3,
        "save() → handle.wait() / write+fsync of the same bytes to a new file, next to it")
    add("until durable ≤ 1.3× write+fsync floor of the floors case (info)", per_round(n, "steady_durable", f, "write_fsync"),
        1.3, "the same against the floors case of each round")
    add("until durable ≤ 1.3× write+fsync floor (first save, info)", per_round(n, "first_durable", f, "write_fsync"), 1.3, "")
    add("until durable ≤ 1.3× the faster write floor of the floors case, buffered or O_DIRECT (info)",
        per_round(n, "steady_durable", _faster_write_floor(f), "write"), 1.3,
        "which way of writing is faster changes from day to day on these VMs (3 GiB: buffered 1.0 s and O_DIRECT "
        "1.5 s one day, 7-20 s and 1.0 s another); nbguard writes O_DIRECT")
    for peer, label in (("torch_save", "torch.save+fsync"), ("dcp_save", "DCP save"), ("dcp_async", "DCP async_save"),
                        ("dcp_async_reused_stager", "DCP async_save (reused stager)"),
                        ("torchsnapshot", "torchsnapshot async_take (+fsync)")):
        add(f"until durable < {label}", per_round(n, "steady_durable", p.get(peer), "durable"), 1.0,
            "nbguard steady full save until durable / peer's", kind="lt")
    peer_best = best(*(_med(p.get(k), "durable") for k in p))
    add("until durable, first save < fastest peer (info)", ratio(_med(n, "first_durable"), peer_best), 1.0,
        "the first save of a session also allocates its staging buffers", kind="lt")
    add("restore cold ≤ 1.3× cold-read floor", next_to("restore", "restore_floor", "read_cold"), 1.3,
        "Guard.restore into live model+optimizer, staging ready (read into it, memory exchanged) / cold read "
        "of the snapshot's own files, next to it")
    add("resume as a new process, cold ≤ 1.3× cold-read floor (info)", next_to("resume_restore", "restore_floor", "read_cold"),
        1.3, "a fresh Guard's prepare started in the background right before its restore (as %%checkpointed does), "
        "the weights in memory never touched, the optimizer without state / the round's cold read next to the restore")
    add("restore cold without a guard ≤ 1.3× cold-read floor (info)", next_to("restore_plain", "restore_floor", "read_cold"),
        1.3, "nbguard.load(...).restore (a script): every byte hashed from disk, then copied into the live tensors")
    read_and_copy = None
    if n and "restore_floor" in n and "steady_stall_floor" in n:
        sums = [a + b for a, b in zip(n["restore_floor"]["values"], n["steady_stall_floor"]["values"], strict=False)]
        read_and_copy = per_round(n, "restore_plain", {"floor": summary(sums)}, "floor")
    add("restore cold without a guard ≤ 1.3× (cold read + one copy_ of the state) (info)", read_and_copy, 1.3,
        "what all or nothing costs at least without spare memory: the bytes hashed from disk, then copied in")
    add("first save after a restore ≤ 1.3× the same guard's next save",
        pooled_ratio("after_restore_stall", "after_restore_next_stall"), 1.3,
        "the restoring guard's first save (its buffers hold the memory the live tensors gave up) / its next one, "
        "after every tensor changed again")
    add("first save after a restore ≤ 1.3× the round's steady save stall (info)",
        per_round(n, "after_restore_stall", n, "steady_stall"), 1.3,
        "the comparison of stop 30: another guard's steady save, made a minute earlier in the round")
    add("first save after a new process's resume ≤ 1.3× the same guard's next save",
        pooled_ratio("resume_first_stall", "resume_next_stall"), 1.3,
        "weights in fresh memory, the optimizer's state created by the restore, prepare started just before it; "
        "its first save / its next one, after every tensor changed again")
    add("restore cold ≤ 1.3× cold-read floor of the floors case (info)", per_round(n, "restore", f, "read_cold"), 1.3,
        "the same against the floors case of each round (one file of the state's size)")
    add("restore cold ≤ 1.3× cold read into fresh memory (info)", per_round(n, "restore", f, "read_cold_fresh"), 1.3,
        "the same, against a read that also pays the page faults a restore into new memory pays")
    for peer, key, label, detail in (
            ("torch_save", "restore", "torch.load", "torch.load + load_state_dict, pages touched"),
            ("torch_save", "restore_mmap", "torch.load(mmap=True) (info)",
             "a lazy map checks nothing, so load_state_dict copies as the disk reads; all or nothing "
             "hashes every byte first, then copies"),
            ("torchsnapshot", "restore", "torchsnapshot restore", "")):
        add(f"restore cold < {label}", per_round(n, "restore", p.get(peer), key), 1.0, detail, kind="lt")
    add("restore cold without a guard < torch.load (info)", per_round(n, "restore_plain", p.get("torch_save"), "restore"),
        1.0, "nbguard.load(...).restore: hashed, then copied", kind="lt")
    if n and "restore_peak_rss_increase" in n:
        # The "peak memory ≤ the state + one I/O piece", restoring into the live state: the
        # increase may be the restore's read window (one 16 MiB piece hashed while the next is read
        # in) plus 1 MiB for the interpreter's own objects, whatever the state's size. (The earlier
        # limit, 1× state + 16 MiB, passed a restore into fresh memory that should fail.)
        add(f"peak RSS increase during a restore ≤ 2 × {PIECE // MiB} MiB read window + 1 MiB",
            ratio(_med(n, "restore_peak_rss_increase"), RESTORE_MEMORY_LIMIT), 1.0,
            "VmHWM after − VmRSS before, cold Guard.restore into the live model + optimizer, staging ready (mapped "
            "file pages included)")
    if n and "restore_plain_peak_rss_increase" in n:
        add(f"peak RSS increase during a restore without a guard ≤ 2 × {PIECE // MiB} MiB read window + 1 MiB",
            ratio(_med(n, "restore_plain_peak_rss_increase"), RESTORE_MEMORY_LIMIT), 1.0,
            "the same for nbguard.load(...).restore")
    if fr:
        add("frozen backbone: stall ≤ 1.1× trainable-only", fr["stall_ratio"], 1.1,
            "nbguard save of the whole model / nbguard save of the head + optimizer only")
        add("frozen backbone: bytes written ≤ 1.1× trainable part", fr["bytes_ratio"], 1.1,
            "written / (trainable params + their Adam state)")
        add("frozen backbone: write through .data detected", 0.0 if fr["data_change_detected"] else 1.0, 0.5,
            "restored model equals the live one after backbone.weight.data.add_(1)")
    limits = {"30s": 0.02, "5m": 0.005}
    for cadence, tp in (r.get("throughput") or {}).items():
        if tp:
            add(f"lost training throughput @{cadence} in %, measured end to end (< {limits.get(cadence, 0.02):.1%})",
                100 * tp["lost_median"], 100 * limits.get(cadence, 0.02),
                f"median of {len(tp['pairs'])} pair(s) of {tp['seconds']:g} s script runs, plain vs @checkpointed "
                f"(range {tp['lost_min']:+.2%} .. {tp['lost_max']:+.2%})")
            add(f"lost training throughput @{cadence} in %, drift-free (< {limits.get(cadence, 0.02):.1%})",
                100 * tp["lost_drift_free_median"], 100 * limits.get(cadence, 0.02),
                "the same runs, each step against the steps within 2 s of it (benchmarks.throughput."
                f"drift_free_seconds; range {tp['lost_drift_free_min']:+.2%} .. {tp['lost_drift_free_max']:+.2%})")
    if tr:
        per_save, write_floor = tr.get("loss_per_save_s"), _med(f, "write_fsync")
        floor_time = (tr["written_per_save"] / (r["state_bytes"] / write_floor)) if write_floor and tr.get(
            "written_per_save") else None
        add("overhead per save ≤ 1.5× durable write of the changed bytes", ratio(per_save, floor_time), 1.5,
            "training time lost per save / (bytes written per save ÷ write+fsync floor bandwidth)")
        direct = _med(f, "write_direct")
        direct_time = tr["written_per_save"] / (r["state_bytes"] / direct) if direct and tr.get("written_per_save") else None
        add("overhead per save ≤ 1.5× O_DIRECT write of the changed bytes (info)", ratio(per_save, direct_time), 1.5,
            "the same against the device floor (no page cache)")
    if n:
        add("peak RSS increase during a save ≤ 1× state (one staged copy)",
            ratio(_med(n, "first_peak_rss_increase"), r["state_bytes"]), 1.1,
            "VmHWM after − VmRSS before, first save of a fresh Guard (allocates the staging buffers); limit 1.1 for slack")
    return targets


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v * 1e3:.0f} ms" if v < 1 else f"{v:.2f} s"


def _fmt_b(v: float | None) -> str:
    if v is None:
        return "—"
    if abs(v) >= GiB:
        return f"{v / GiB:.2f} GiB"
    if abs(v) >= MiB:
        return f"{v / MiB:.1f} MiB"
    return f"{v:.0f} B"


def _rate(nbytes: float, seconds: float | None) -> str:
    return f"{nbytes / GiB / seconds:.2f} GiB/s" if seconds else "—"


def figure_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, time/size, rate, note) rows of the main table."""
    size = r["state_bytes"]
    f, n, p = r.get("floors"), r.get("nbguard"), r.get("peers", {})
    rows: list[tuple[str, str, str, str]] = []
    if f:
        rows += [
            ("floor: copy_ into preallocated", _fmt_s(_med(f, "copy_prealloc")), _rate(size, _med(f, "copy_prealloc")), ""),
            ("floor: clone into fresh memory", _fmt_s(_med(f, "clone")), _rate(size, _med(f, "clone")), ""),
            ("floor: write + fsync", _fmt_s(_med(f, "write_fsync")), _rate(size, _med(f, "write_fsync")),
             "new file, after priming (see README)"),
            ("  write O_DIRECT + fsync (device)", _fmt_s(_med(f, "write_direct")), _rate(size, _med(f, "write_direct")),
             "context: no page cache"),
            ("  write, chunked writeback + DONTNEED", _fmt_s(_med(f, "write_chunked_writeback")),
             _rate(size, _med(f, "write_chunked_writeback")), "context: page cache recycled per 64 MiB"),
            ("  write + fsync, unprimed (3 s pause)", _fmt_s(_med(f, "write_fsync_unprimed")),
             _rate(size, _med(f, "write_fsync_unprimed")), "context: VM worst case, pages back from the host"),
            ("floor: cold read (fadvise DONTNEED)", _fmt_s(_med(f, "read_cold")), _rate(size, _med(f, "read_cold")),
             f"evicted: {f['eviction_verified']}"),
            ("  cold read, page cache kept", _fmt_s(_med(f, "read_cold_kept")), _rate(size, _med(f, "read_cold_kept")),
             "context: a plain read; its page cache comes from memory the host took back"),
            ("floor: warm read", _fmt_s(_med(f, "read_warm")), _rate(size, _med(f, "read_warm")), ""),
            ("  cold read into fresh memory", _fmt_s(_med(f, "read_cold_fresh")), _rate(size, _med(f, "read_cold_fresh")),
             "context: what a restore into a new process must also pay (page faults)"),
            ("hash xxh3_128 / sha256 / md5", "", " / ".join(f"{v:.1f}" for v in f["hash_gib_s"].values()) + " GiB/s",
             "256 MiB"),
        ]
    if n:
        rows += [
            ("nbguard stall, first save (fresh buffers)", _fmt_s(_med(n, "first_stall")), _rate(size, _med(n, "first_stall")), ""),
            ("nbguard stall, first save of a guarded run", _fmt_s(_med(n, "first_prepared_stall")),
             _rate(size, _med(n, "first_prepared_stall")), f"after Guard.prepare ({_fmt_s(_med(n, 'prepare_s'))}, background)"),
            ("  its next (steady) save", _fmt_s(_med(n, "prepared_steady_stall")), _rate(size, _med(n, "prepared_steady_stall")),
             f"median of {GUARDED_RUNS_PER_ROUND} guarded runs a round"),
            ("nbguard stall, steady full save", _fmt_s(_med(n, "steady_stall")), _rate(size, _med(n, "steady_stall")),
             "all tensors changed, buffers reused"),
            ("nbguard until durable, first save", _fmt_s(_med(n, "first_durable")), _rate(size, _med(n, "first_durable")),
             f"wrote {_fmt_b(_med(n, 'first_written'))}"),
            ("nbguard until durable, steady full save", _fmt_s(_med(n, "steady_durable")), _rate(size, _med(n, "steady_durable")),
             f"wrote {_fmt_b(_med(n, 'steady_written'))}"),
            ("nbguard unchanged save: stall / durable", f"{_fmt_s(_med(n, 'unchanged_stall'))} / {_fmt_s(_med(n, 'unchanged_durable'))}",
             "", f"wrote {_fmt_b(_med(n, 'unchanged_written'))}"),
            ("nbguard restore cold (model+opt), Guard.restore", _fmt_s(_med(n, "restore")), _rate(size, _med(n, "restore")),
             f"staging ready; read {_fmt_b(_med(n, 'restore_read_bytes'))}"),
            ("  its next save / the one after", f"{_fmt_s(_med(n, 'after_restore_stall'))} / "
             f"{_fmt_s(_med(n, 'after_restore_next_stall'))}", "", "each after every tensor changed"),
            ("resume as a new process (prepare started, then restore)", _fmt_s(_med(n, "resume_restore")), "",
             "weights in fresh memory, the optimizer without state, the snapshot evicted"),
            ("  its first save / the next", f"{_fmt_s(_med(n, 'resume_first_stall'))} / "
             f"{_fmt_s(_med(n, 'resume_next_stall'))}", "", "each after every tensor changed"),
            ("nbguard restore cold, without a guard", _fmt_s(_med(n, "restore_plain")), _rate(size, _med(n, "restore_plain")),
             f"nbguard.load(...).restore; read {_fmt_b(_med(n, 'restore_plain_read_bytes'))}"),
            ("  floors next to them: copy_ / write+fsync / cold read",
             f"{_fmt_s(_med(n, 'steady_stall_floor'))} / {_fmt_s(_med(n, 'steady_durable_floor'))} / "
             f"{_fmt_s(_med(n, 'restore_floor'))}", "",
             f"same bytes, just before or after the steady save and the restore; read {_fmt_b(_med(n, 'restore_floor_read_bytes'))}"),
            ("nbguard restore cold, model only", _fmt_s(_med(n, "restore_model_only")), "",
             f"read {_fmt_b(_med(n, 'restore_model_only_read_bytes'))} of {_fmt_b(r['model_bytes'])} model"),
            ("first optimizer-style update after restore", _fmt_s(_med(n, "first_update_after_restore")), "",
             f"normal: {_fmt_s(_med(n, 'update_normal'))}"),
            ("peak RSS increase: first save / steady save", f"{_fmt_b(_med(n, 'first_peak_rss_increase'))} / "
             f"{_fmt_b(_med(n, 'steady_peak_rss_increase'))}", "", f"state {_fmt_b(size)}"),
            ("peak RSS increase: restore / without a guard", f"{_fmt_b(_med(n, 'restore_peak_rss_increase'))} / "
             f"{_fmt_b(_med(n, 'restore_plain_peak_rss_increase'))}", "", "file pages mapped included"),
        ]
    labels = {"torch_save": "torch.save + fsync", "dcp_save": "DCP save", "dcp_async": "DCP async_save",
              "dcp_async_reused_stager": "DCP async_save, reused stager",
              "torchsnapshot": "torchsnapshot async_take"}
    for key, label in labels.items():
        d = p.get(key)
        if not d:
            continue
        rows.append((f"{label}: stall", _fmt_s(_med(d, "stall")), _rate(size, _med(d, "stall")),
                     f"peak RSS +{_fmt_b(_med(d, 'peak_rss_increase'))}"))
        note = f"wrote {_fmt_b(_med(d, 'written'))}"
        if key == "torchsnapshot":
            note += f"; wait() {_fmt_s(_med(d, 'wait'))} + fsync of its files"
        rows.append((f"{label}: until durable", _fmt_s(_med(d, "durable")), _rate(size, _med(d, "durable")), note))
        if _med(d, "restore") is not None:
            rows.append((f"{label}: restore cold", _fmt_s(_med(d, "restore")), _rate(size, _med(d, "restore")),
                         f"read {_fmt_b(_med(d, 'restore_read_bytes'))}"))
        if _med(d, "restore_mmap") is not None:
            rows.append((f"{label}: restore cold, torch.load(mmap=True)", _fmt_s(_med(d, "restore_mmap")),
                         _rate(size, _med(d, "restore_mmap")), f"read {_fmt_b(_med(d, 'restore_mmap_read_bytes'))}"))
            rows.append((f"{label}: first update after torch.load / mmap=True",
                         f"{_fmt_s(_med(d, 'restore_first_update'))} / {_fmt_s(_med(d, 'restore_mmap_first_update'))}",
                         "", ""))
    if "torchsnapshot_status" in r and not p.get("torchsnapshot"):
        rows.append(("torchsnapshot", "", "", r["torchsnapshot_status"]))
    fr = r.get("frozen")
    if fr:
        rows += [
            ("frozen 95%: nbguard stall / head-only stall", f"{_fmt_s(_med(fr, 'stall'))} / {_fmt_s(_med(fr, 'ref_stall'))}",
             f"×{fr['stall_ratio']:.2f}", f"median of paired ratios; state {_fmt_b(fr['state_bytes'])}"),
            ("frozen 95%: written / trainable part", f"{_fmt_b(_med(fr, 'written'))} / {_fmt_b(fr['trainable_bytes'])}",
             f"×{fr['bytes_ratio']:.2f}", f"first full save wrote {_fmt_b(fr['first']['written'])}"),
            ("frozen 95%: backbone .data.add_(1) detected", "yes" if fr["data_change_detected"] else "NO", "",
             f"third save wrote {_fmt_b(fr['data_change_written'])}"),
        ]
    tr = r.get("training")
    if tr:
        rows += [
            ("training: baseline / guarded steps/s", f"{tr['baseline_steps_per_s']:.2f} / {tr['guarded_steps_per_s']:.2f}",
             "", f"{tr['model']}, {_fmt_b(tr['state_bytes'])} state, {tr['step_s'] * 1e3:.0f} ms/step"),
            ("training: lost throughput @30 s (measured)", f"{tr['lost_throughput_30s_measured']:.2%}", "",
             "per pair: " + ", ".join(f"{x:.1%}" for x in tr["lost_throughput_30s_per_pair"])),
            (f"training: lost throughput @{tr['dense_every_s']:g} s (measured)", f"{tr['lost_throughput_dense_measured']:.2%}",
             "", f"derived from the per-save loss: {tr['lost_throughput_dense_derived']:.2%}"),
            ("training: loss per save (measured)", _fmt_s(tr["loss_per_save_s"]), "",
             f"median of {tr['saves_measured']} saves; wrote {_fmt_b(tr['written_per_save'])} per save"),
            ("training: lost throughput @30 s (derived)", f"{tr['lost_throughput_30s_derived']:.3%}", "", "loss per save / 30 s"),
            ("training: lost throughput @5 min (DERIVED)", f"{tr['lost_throughput_5min_derived']:.3%}", "",
             "measured loss per save / 300 s (not run for real)"),
        ]
    for cadence, tp in (r.get("throughput") or {}).items():
        if tp:
            rows.append((f"throughput @{cadence}, end to end: plain / guarded run",
                         f"{statistics.median(x['plain_s'] for x in tp['pairs']):.1f} s / "
                         f"{statistics.median(x['guarded_s'] for x in tp['pairs']):.1f} s",
                         f"{tp['lost_median']:+.2%}",
                         "per pair: " + ", ".join(f"{x['lost']:+.2%}" for x in tp["pairs"])
                         + "; against each process's own reference steps: "
                         + ", ".join(f"{x['lost_vs_reference']:+.2%}" for x in tp["pairs"])
                         + "; drift-free: " + ", ".join(f"{x['lost_drift_free']:+.2%}" for x in tp["pairs"])))
    return rows


def render_table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def reporting_lines(summary: dict[str, Any]) -> list[str]:
    """One line per timed operation: how many samples a free-page-reporting pass overlapped, and the
    medians with and without one (``floors.ReportingLog``); nothing where the kernel does not count."""
    if not summary:
        return []
    lines = ["", "timed operations overlapped by a free-page-reporting pass (diagnostic, every sample kept):"]
    for label, s in summary.items():
        clean = _fmt_s(s["median_clean"]) if s["median_clean"] is not None else "—"
        hit = _fmt_s(s["median_overlapped"]) if s["median_overlapped"] is not None else "—"
        lines.append(f"- {label}: {s['overlapped']} of {s['n']} (median {hit} overlapped, {clean} not)")
    return lines


def phase_lines(summary: dict[str, Any]) -> list[str]:
    """One line per save label of ``SavePhases``: the medians of the phases, and the slowest save's."""
    if not summary:
        return []

    def phases(s: dict[str, Any]) -> str:
        return ", ".join(f"{k} {s[k] * 1e3:.1f} ms" for k in ("stall", *SavePhases.PHASES))

    def meanwhile(s: dict[str, Any]) -> str:
        threads = ", ".join(f"{k.split(':', 1)[1]} {v:.1f}" for k, v in sorted(s.items())
                            if k.startswith("thread_ms:") and v >= 0.5)
        return (f"steal {s.get('steal_ms', 0):.0f} ms, others {s.get('others_ms', 0):.0f} ms, "
                f"{s.get('involuntary_switches', 0):.0f} involuntary switches, {s.get('minor_faults', 0):.0f} minor faults, kdamond {s.get('kdamond_ms', 0):.0f} ms, "
                f"PSI cpu {s.get('psi_cpu_ms', 0):.1f} / memory {s.get('psi_memory_ms', 0):.1f} ms, "
                f"gc {s.get('gc_ms', 0):.1f} ms ({s.get('gc_collections', 0):.0f}), threads' CPU ms: {threads or '—'}")

    lines = ["", "where the stall of a save after a restore or a resume went (diagnostic):"]
    for label, s in summary.items():
        slow, fast = s["slowest"], s.get("fastest") or s["slowest"]
        lines.append(f"- {label} ({s['n']}): median {phases(s['median'])}; slowest {phases(slow)}, "
                     f"{slow['fresh_buffers']} fresh buffers, {slow['since_restore']:.2f} s after the restore; "
                     f"meanwhile {meanwhile(slow)}; the fastest ({fast['stall'] * 1e3:.1f} ms) meanwhile {meanwhile(fast)}")
    return lines


def render_markdown(r: dict[str, Any], rows, targets) -> str:
    m = r["machine"]
    out = [f"# nbguard benchmark — {_fmt_b(r['state_bytes'])} of state", "",
           f"`{r['command']}`", "",
           f"- machine: {m['platform']}; {m['cpu']}; {m['cores']} cores; {m['ram_gib']} GiB RAM",
           f"- torch {m['torch']} ({m['torch_threads']} threads), Python {m['python']}, nbguard {m.get('nbguard')} "
           f"(commit {m.get('git_commit')}{', nbguard/ modified' if m.get('nbguard_tree_dirty') else ''})",
           f"- conditioning before timed writes: {r['settle']}",
           f"- date: {m['date']}; repeats: {r['repeats']} (medians); run took {r['elapsed_s']:.0f} s; load average "
           f"at start {r['loadavg_start'][0]:.1f}, at end {r['loadavg_end'][0]:.1f} (shared machine: other work "
           "competes for the 2 cores)",
           f"- state: {r['layers']} × Linear({r['width']}) + Adam: {_fmt_b(r['state_bytes'])} "
           f"({r['tensors']} tensors), model weights {_fmt_b(r['model_bytes'])}", "",
           "## Targets", "", "| target | ratio | limit | result |", "|---|---|---|---|"]
    for t in targets:
        v = "—" if t["value"] is None else f"{t['value']:.2f}"
        out.append(f"| {t['target']} | {v} | {t['limit']} | {t['status']} |")
    out += ["", "## Figures", "", "| figure | time / size | rate | note |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    out += reporting_lines(r.get("page_reporting") or {})
    out += phase_lines(r.get("save_phases") or {})
    if r.get("errors"):
        out += ["", "## Errors", ""] + [f"- {k}: `{v.splitlines()[-1]}`" for k, v in r["errors"].items()]
    if r.get("notes"):
        out += ["", "## nbguard messages during the run", ""] + [f"- {n}" for n in sorted(set(r["notes"]))]
    out += ["", "See benchmarks/README.md for how each figure is measured."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=0.75, help="total state size (params + Adam state)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--only", default=",".join(CASES), help="comma-separated: " + ",".join(CASES))
    parser.add_argument("--settle", choices=("prime", "sleep", "none"), default=fl.SETTLE_MODE,
                        help="conditioning before each timed save/write/allocation (see floors.SETTLE_MODE)")
    parser.add_argument("--settle-s", type=float, default=fl.SETTLE_S, help="pause for --settle sleep")
    parser.add_argument("--train-segment-s", type=float, default=30.0)
    parser.add_argument("--train-pairs", type=int, default=2)
    parser.add_argument("--train-cadence-s", type=float, default=30.0)
    parser.add_argument("--train-dense-s", type=float, default=20.0,
                        help="length of each segment of the dense pair (a save every --train-dense-every-s)")
    parser.add_argument("--train-dense-every-s", type=float, default=4.0)
    parser.add_argument("--throughput", default="30s:90:2",
                        help="end-to-end throughput runs, CADENCE:SECONDS:PAIRS[,...] (benchmarks.throughput); "
                             "e.g. 30s:90:2,5m:330:1 adds the default cadence (about 12 min more)")
    args = parser.parse_args(argv)
    only = {c.strip() for c in args.only.split(",") if c.strip()}
    unknown = only - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {','.join(CASES)}")

    fl.SETTLE_MODE, fl.SETTLE_S = args.settle, args.settle_s
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    scratch = os.path.join(args.out, f".scratch-{os.getpid()}")
    os.makedirs(scratch, exist_ok=True)
    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    r: dict[str, Any] = {"command": command.strip(), "machine": machine_info(), "repeats": args.repeats,
                         "size_gib": args.size_gib, "cases": sorted(only), "peers": {}, "errors": {}, "notes": []}
    r["loadavg_start"] = os.getloadavg()
    log(f"nbguard benchmark: {r['machine']['cpu']}, {r['machine']['cores']} cores, {r['machine']['ram_gib']} GiB, "
        f"torch {torch.__version__}")

    model, opt = build_state(args.size_gib)
    tensors = state_tensors(model, opt)
    fl.PRIME_DIR = scratch
    fl.PRIME_BYTES = 2 * nbytes_of(tensors) + 256 * MiB
    r.update(settle=args.settle, prime_bytes=fl.PRIME_BYTES, state_bytes=nbytes_of(tensors), model_bytes=nbytes_of(model.state_dict().values()), tensors=len(tensors),
             layers=len(model), width=model[0].in_features)
    del tensors
    log(f"state: {len(model)} x Linear({model[0].in_features}) + Adam = {r['state_bytes'] / GiB:.2f} GiB "
        f"in {r['tensors']} tensors")

    def attempt(name: str, fn, *a, **k):
        try:
            return fn(*a, **k)
        except Exception:  # noqa: BLE001 - one failing case must not lose the others
            r["errors"][name] = traceback.format_exc()
            log(f"{name} FAILED:\n{r['errors'][name]}")
            return None
        finally:
            gc.collect()

    floors = dcp_reused = None
    try:
        cases: list[tuple[str, Any]] = []
        if "floors" in only:
            floors = fl.Floors()
            cases.append(("floors", floors.once))
            r["hash_gib_s"] = attempt("hashing", fl.hash_speeds, args.repeats)
        if "nbguard" in only:
            cases.append(("nbguard", functools.partial(nbguard_once, notes=r["notes"], paired=fl.PairedFloors())))
        if "torch_save" in only:
            cases.append(("torch_save", peers.torch_save_once))
        if "dcp" in only:
            dcp_reused = DcpReusedStager()
            cases += [("dcp_save", peers.dcp_save_once), ("dcp_async", peers.dcp_async_once),
                      ("dcp_async_reused_stager", dcp_reused.once)]
        if "torchsnapshot" in only:
            ok, status = peers.torchsnapshot_status()
            r["torchsnapshot_status"] = f"torchsnapshot {status}" if ok else status
            if ok:
                cases.append(("torchsnapshot", peers.torchsnapshot_once))
            else:
                log(status)
        results = attempt("rounds", run_rounds, cases, model, opt, scratch, args.repeats) or {}
        if floors is not None:
            floors.close()
        if dcp_reused is not None:
            dcp_reused.close()
        r["floors"] = results.get("floors")
        if r["floors"]:
            r["floors"]["eviction_verified"] = r["floors"]["read_cold_read_bytes"]["min"] >= 0.99 * r["state_bytes"]
            r["floors"]["hash_gib_s"] = r.get("hash_gib_s") or {}
        r["nbguard"] = results.get("nbguard")
        r["peers"] = {k: v for k, v in results.items() if k not in ("floors", "nbguard")}
        r["peers"] = {k: v for k, v in r["peers"].items() if v}
        param_bytes = r["model_bytes"]
        del model, opt
        gc.collect()
        if "frozen" in only:
            r["frozen"] = attempt("frozen", run_frozen, param_bytes, scratch, max(FROZEN_PAIRS, args.repeats), r["notes"])
        if "training" in only:
            from .training import run_training

            r["training"] = attempt("training", run_training, os.path.join(scratch, "training"),
                                    segment_s=args.train_segment_s, pairs=args.train_pairs,
                                    cadence_s=args.train_cadence_s, dense_s=args.train_dense_s,
                                    dense_every_s=args.train_dense_every_s, log=log)
        if "throughput" in only:
            from .throughput import measure

            r["throughput"] = {}
            for spec in args.throughput.split(","):
                cadence, seconds, pairs = spec.split(":")
                r["throughput"][cadence] = attempt(f"throughput @{cadence}", measure, cadence, float(seconds),
                                                   int(pairs), log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    r["page_reporting"] = fl.REPORTING.summary()
    r["save_phases"] = SAVE_PHASES.summary()
    r["elapsed_s"] = time.perf_counter() - started
    r["loadavg_end"] = os.getloadavg()
    r["cpu_s"] = sum(os.times()[:2])
    rows = figure_rows(r)
    targets = build_targets(r)
    r["targets"] = targets
    print()
    print(render_table(rows, ("figure", "time / size", "rate", "note")))
    print()
    print(render_table([(t["target"], "—" if t["value"] is None else f"{t['value']:.2f}", str(t["limit"]), t["status"])
                        for t in targets], ("target", "ratio", "limit", "result")))
    for line in reporting_lines(r.get("page_reporting") or {}) + phase_lines(r.get("save_phases") or {}):
        print(line)
    md = render_markdown(r, rows, targets)
    tag = f"size-{args.size_gib:g}gib"
    for name in ("latest", tag):
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(r, f, indent=1, default=str)
        with open(os.path.join(args.out, f"{name}.md"), "w") as f:
            f.write(md)
    log(f"\nwrote {os.path.join(args.out, 'latest.json')} and latest.md ({tag}.*) in {r['elapsed_s']:.0f} s")
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
