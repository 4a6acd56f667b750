"""The benchmark's targets: ratios of figures measured in the same rounds are taken round by round."""

from __future__ import annotations

import statistics

import pytest
import torch

from benchmarks.floors import summary
from benchmarks.run import build_targets, per_round


def _case(**values: list[float]) -> dict:
    return {key: summary(v) for key, v in values.items()}


def test_per_round_takes_the_median_of_the_ratios_within_each_round():
    # round 1 ran during a slow minute: both sides doubled; the ratio of medians would say 2.0
    tool = _case(t=[1.2, 2.4, 1.2])
    floor = _case(f=[1.0, 2.0, 0.6])
    assert per_round(tool, "t", floor, "f") == 1.2
    assert per_round(tool, "t", _case(f=[1.0, 2.0]), "f") == 1.2 / 1.5  # rounds do not line up: medians
    assert per_round(tool, "t", None, "f") is None


def test_the_floor_targets_use_the_floors_measured_next_to_the_operation():
    floors = _case(copy_prealloc=[0.10, 0.10, 0.10], write_fsync=[1.0, 1.0, 1.0], read_cold=[0.5, 0.5, 0.5],
                   read_cold_fresh=[0.6, 0.6, 0.6])
    nbguard = _case(steady_stall=[0.12, 0.24, 0.12], steady_stall_floor=[0.1, 0.2, 0.1],
                    steady_durable=[1.1, 1.1, 1.1], steady_durable_floor=[1.0, 1.0, 1.0],
                    restore=[0.6, 0.9, 0.6], restore_floor=[0.5, 0.75, 0.5], restore_plain=[0.6, 0.9, 0.6],
                    resume_restore=[0.7, 0.75, 0.5],
                    first_stall=[0.2] * 3, first_prepared_stall=[0.12] * 3, first_durable=[1.2] * 3)
    targets = {t["target"]: t for t in build_targets({"floors": floors, "nbguard": nbguard, "peers": {},
                                                      "state_bytes": 1})}
    stall = targets["stall ≤ 1.3× preallocated-copy floor (steady save, buffers reused)"]
    assert (round(stall["value"], 6), stall["status"]) == (1.2, "PASS")
    unpaired = targets["stall ≤ 1.3× preallocated-copy floor of the floors case (info)"]
    assert (round(unpaired["value"], 6), unpaired["status"]) == (1.2, "PASS")  # median of 1.2, 2.4, 1.2
    restore = targets["restore cold ≤ 1.3× cold-read floor"]
    assert (round(restore["value"], 6), restore["status"]) == (1.2, "PASS")
    assert targets["restore cold ≤ 1.3× cold-read floor of the floors case (info)"]["status"] == "PASS"
    assert round(targets["until durable ≤ 1.3× write+fsync floor (steady save)"]["value"], 6) == 1.1
    assert round(targets["restore cold without a guard ≤ 1.3× cold-read floor (info)"]["value"], 6) == 1.2
    resume = targets["resume as a new process, cold ≤ 1.3× cold-read floor (info)"]
    assert (round(resume["value"], 6), resume["status"]) == (1.0, "PASS")  # 1.4, 1.0, 1.0
    read_and_copy = targets["restore cold without a guard ≤ 1.3× (cold read + one copy_ of the state) (info)"]
    assert round(read_and_copy["value"], 6) == 1.0  # 0.6 / (0.5 + 0.1), 0.9 / (0.75 + 0.2), 0.6 / (0.5 + 0.1)

    del nbguard["restore_floor"]  # a run without the paired floor falls back to the floors case
    targets = {t["target"]: t for t in build_targets({"floors": floors, "nbguard": nbguard, "peers": {},
                                                      "state_bytes": 1})}
    assert round(targets["restore cold ≤ 1.3× cold-read floor"]["value"], 6) == 1.2


def test_a_restore_may_add_its_read_window_to_peak_memory_not_a_copy_of_the_state():
    from benchmarks.floors import MiB
    from benchmarks.run import RESTORE_MEMORY_LIMIT

    name = "peak RSS increase during a restore ≤ 2 × 16 MiB read window + 1 MiB"

    def status(increase: float) -> str:
        nbguard = _case(restore_peak_rss_increase=[increase] * 3)
        targets = {t["target"]: t for t in build_targets({"nbguard": nbguard, "peers": {},
                                                          "state_bytes": 3 * 1024 * MiB})}
        return targets[name]["status"]

    assert RESTORE_MEMORY_LIMIT == 33 * MiB
    assert status(32.1 * MiB) == "PASS"  # two mapped 16 MiB pieces and a few Python objects
    assert status(3 * 1024 * MiB) == "MISS"  # read into fresh memory and swapped in: a second state
    assert status(40 * MiB) == "MISS"  # a third piece in flight is more than the issue allows


def test_the_first_save_after_a_restore_is_compared_with_the_same_guards_next_save():
    nbguard = _case(after_restore_stall=[0.24, 0.50, 0.26], after_restore_next_stall=[0.20, 0.40, 0.20],
                    steady_stall=[0.10, 0.20, 0.10])
    targets = {t["target"]: t for t in build_targets({"nbguard": nbguard, "peers": {}, "state_bytes": 1})}
    after = targets["first save after a restore ≤ 1.3× the same guard's next save"]
    assert (round(after["value"], 6), after["status"]) == (1.25, "PASS")  # 1.2, 1.25, 1.3
    other_guard = targets["first save after a restore ≤ 1.3× the round's steady save stall (info)"]
    assert (round(other_guard["value"], 6), other_guard["status"]) == (2.5, "MISS")


def test_a_guarded_runs_first_save_is_compared_with_that_same_runs_next_save():
    nbguard = _case(first_prepared_stall=[0.30, 0.45, 0.30], prepared_steady_stall=[0.25, 0.40, 0.20],
                    steady_stall=[0.20, 0.20, 0.20])
    targets = {t["target"]: t for t in build_targets({"nbguard": nbguard, "peers": {}, "state_bytes": 1})}
    same_run = targets["first save of a guarded run ≤ 1.3× the same run's steady save stall"]
    assert (round(same_run["value"], 6), same_run["status"]) == (1.2, "PASS")  # 1.2, 1.125, 1.5
    other_guard = targets["first save of a guarded run ≤ 1.3× the steady save of the round's first guard (info)"]
    assert (round(other_guard["value"], 6), other_guard["status"]) == (1.5, "MISS")


def test_a_first_save_is_judged_by_every_pairs_own_ratio_pooled_over_the_rounds():
    from benchmarks.run import _medians_of

    # round 2's medians (0.24 / 0.16 = 1.5) pair a first save with another run's next save; every pair's
    # own ratio is at most 1.25 but one
    rounds = [[(0.23, 0.24), (0.24, 0.23), (0.22, 0.22)],
              [(0.24, 0.24), (0.25, 0.152), (0.20, 0.16)],
              [(0.23, 0.23), (0.24, 0.20), (0.16, 0.16)]]
    per_round = [_medians_of(pairs, "first_prepared_stall", "prepared_steady_stall") for pairs in rounds]
    nbguard: dict = _case(steady_stall=[0.2] * 3, **{k: [r[k] for r in per_round]
                                                      for k in ("first_prepared_stall", "prepared_steady_stall")})
    nbguard["first_prepared_stall_ratios"] = [r["first_prepared_stall_ratios"] for r in per_round]
    name = "first save of a guarded run ≤ 1.3× the same run's steady save stall"
    target = next(t for t in build_targets({"nbguard": nbguard, "peers": {}, "state_bytes": 1}) if t["target"] == name)
    pooled = sorted(f / n for pairs in rounds for f, n in pairs)
    assert (round(target["value"], 6), target["status"]) == (round(pooled[4], 6), "PASS")
    assert round(nbguard["first_prepared_stall"]["values"][1] / nbguard["prepared_steady_stall"]["values"][1], 2) == 1.5


def test_the_paired_copy_floor_is_timed_after_settling_as_the_save_it_is_compared_with(monkeypatch):
    import torch

    from benchmarks import floors

    events: list[str] = []
    monkeypatch.setattr(floors, "settle", lambda: events.append("settle"))
    paired = floors.PairedFloors()
    source = torch.arange(1000, dtype=torch.float32)
    real_copy = torch.Tensor.copy_

    def recording_copy(self, *args, **kwargs):
        events.append("copy")
        return real_copy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", recording_copy)
    paired.copy([source])
    assert events == ["settle", "copy"]


def test_the_paired_read_floor_reads_into_memory_touched_just_before(monkeypatch, tmp_path):
    """A guarded restore reads into staging memory its run touched just before: the floor next to it
    reads into memory as warm, not into a buffer left idle since the last floor."""
    import torch

    from benchmarks import floors

    events: list[str] = []
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 64)
    real_fill, real_read = torch.Tensor.fill_, floors.read_views

    def recording_fill(self, *args, **kwargs):
        events.append("touch")
        return real_fill(self, *args, **kwargs)

    def recording_read(*args, **kwargs):
        events.append("read")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "fill_", recording_fill)
    monkeypatch.setattr(floors, "read_views", recording_read)
    paired = floors.PairedFloors()
    seconds, _ = paired.read_cold([str(path)])
    assert events == ["touch", "read"] and seconds > 0
    assert paired.buffer is not None and bytes(paired.buffer[:256].numpy()) == bytes(range(256))


def test_write_overlap_times_the_copy_alone_and_beside_a_writer_and_leaves_no_file(tmp_path, capsys):
    from benchmarks import write_overlap

    assert write_overlap.main(["--size-gib", "0.02", "--rounds", "2", "--folder", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("copy alone", "copy while writing", "write alone", "write beside the copy"):
        assert f"  {name}" in out
    assert "copy while writing / copy alone, median of rounds:" in out
    assert list(tmp_path.iterdir()) == []


def test_the_read_floor_drops_the_page_cache_behind_it(tmp_path):
    """The read floor holds one piece of page cache, as a restore does, not the whole file: read
    twice with pages dropped behind, the second read comes from the device again."""
    import os

    import torch

    from benchmarks import floors

    path = tmp_path / "blob.bin"
    data = os.urandom(4 * floors.MiB)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    floors.evict_file(str(path))
    into = torch.empty(len(data), dtype=torch.uint8)
    view = floors.byte_views([into])[0]

    def device_bytes(drop_behind: bool) -> int:
        with floors.IoDelta() as io:
            assert floors.read_views(str(path), [view], drop_behind=drop_behind) == len(data)
        return io.read_bytes

    if device_bytes(drop_behind=True) < len(data):
        pytest.skip("this file system does not count reads from its device (tmpfs?)")
    assert bytes(into.numpy()) == data
    assert device_bytes(drop_behind=True) >= len(data)  # nothing was left in the page cache
    assert device_bytes(drop_behind=False) >= len(data)
    assert device_bytes(drop_behind=False) == 0  # a plain read keeps its pages


def test_the_reporting_log_times_a_block_and_notes_whether_a_reporting_pass_ran_during_it(monkeypatch):
    import benchmarks.floors as fl

    counter = iter([100, 100, 100, 164])
    monkeypatch.setattr(fl, "reported_kib", lambda: next(counter))
    log = fl.ReportingLog()
    with log.timed("copy") as quiet:
        sum(range(10_000))
    with log.timed("copy") as overlapped:
        sum(range(10_000))
    assert quiet.seconds > 0 and overlapped.seconds > 0
    assert log.samples["copy"] == [(quiet.seconds, False), (overlapped.seconds, True)]
    assert log.summary()["copy"]["overlapped"] == 1


def test_the_reporting_log_keeps_nothing_where_the_kernel_does_not_count(monkeypatch):
    import benchmarks.floors as fl

    monkeypatch.setattr(fl, "reported_kib", lambda: None)
    log = fl.ReportingLog()
    with log.timed("restore") as watch:
        pass
    assert watch.seconds >= 0 and log.samples == {}


def test_the_first_save_against_dcp_is_the_first_save_a_run_gets_and_the_unprepared_one_is_info():
    nbguard = _case(first_prepared_stall=[0.04] * 3, first_stall=[0.16] * 3)
    dcp = _case(stall=[0.15] * 3)
    floors = _case(clone=[0.14] * 3)
    targets = {t["target"]: t for t in build_targets({"floors": floors, "nbguard": nbguard,
                                                      "peers": {"dcp_async": dcp}, "state_bytes": 1})}
    first = targets["first-save stall < DCP async_save stall (default stager)"]
    assert (round(first["value"], 6), first["status"]) == (round(0.04 / 0.15, 6), "PASS")
    unprepared = targets["first save without Guard.prepare < DCP async_save stall (default stager, info)"]
    assert (round(unprepared["value"], 6), unprepared["status"]) == (round(0.16 / 0.15, 6), "MISS")
    assert round(targets["first save without Guard.prepare ≤ 1.3× the clone floor (info)"]["value"], 6) == round(0.16 / 0.14, 6)


def test_the_copy_floor_can_copy_into_given_buffers_one_of_each_tensors_size():
    from benchmarks.floors import PairedFloors

    tensors = [torch.randn(3, 4), torch.arange(5, dtype=torch.int64), torch.randn(12)]  # two of 48 bytes
    buffers = [torch.zeros(48, dtype=torch.uint8), torch.zeros(40, dtype=torch.uint8), torch.zeros(48, dtype=torch.uint8)]
    PairedFloors().copy(tensors, into=buffers)
    copied = sorted(bytes(b.numpy()) for b in buffers)
    assert copied == sorted(bytes(t.contiguous().view(torch.uint8).numpy()) for t in tensors)

    with pytest.raises(ValueError, match="no buffer of 40 bytes"):
        PairedFloors().copy(tensors, into=[buffers[0], buffers[2], torch.zeros(48, dtype=torch.uint8)])


def test_restores_wait_until_no_page_reporting_pass_has_run_for_a_while(monkeypatch):
    import benchmarks.floors as fl

    monkeypatch.setattr(fl, "reported_kib", lambda: None)  # a kernel that does not count passes
    assert fl.wait_for_reporting_quiet(quiet_s=5.0) == 0.0

    counts = iter([0, 0, 2048, 4096] + [4096] * 1000)  # a pass running as the wait begins, then none
    monkeypatch.setattr(fl, "reported_kib", lambda: next(counts))
    waited = fl.wait_for_reporting_quiet(quiet_s=0.2, limit_s=5.0)
    assert 0.3 <= waited < 2.0  # ~3 polls of 50 ms until the count settles, then 0.2 s of quiet

    monkeypatch.setattr(fl, "reported_kib", iter(range(10**6)).__next__)  # passes never stop
    assert 0.3 <= fl.wait_for_reporting_quiet(quiet_s=1.0, limit_s=0.3) < 1.0


def test_the_reporting_diagnostic_keeps_the_rounds_samples_not_the_warm_ups(monkeypatch, tmp_path):
    """``run_rounds`` warms every case up on a small state first; the reporting diagnostic is about the
    full-size state, so only the rounds' samples are kept."""
    import benchmarks.floors as fl
    import benchmarks.run as run

    monkeypatch.setattr(fl, "reported_kib", lambda: 0)
    monkeypatch.setattr(fl, "REPORTING", fl.ReportingLog())
    sizes: list[int] = []

    def case(model, opt, folder):
        with fl.REPORTING.timed("restore"):
            sizes.append(sum(p.numel() for p in model.parameters()))
        return {"seconds": 0.0}

    model, opt = run.build_state(0.02, seed=3)
    run.run_rounds([("case", case)], model, opt, str(tmp_path), repeats=2)
    assert len(sizes) == 3 and sizes[0] < sizes[1] == sizes[2]  # the warm-up, then two rounds
    assert len(fl.REPORTING.samples["restore"]) == 2


def test_the_durable_save_is_also_shown_against_the_faster_of_the_buffered_and_direct_write_floors():
    # round 1: buffered writeback fast (1.0 s), O_DIRECT slow; round 2 and 3: the other way round
    floors = _case(write_fsync=[1.0, 8.0, 7.0], write_direct=[1.5, 1.0, 1.1])
    nbguard = _case(steady_durable=[1.4, 1.2, 1.2])
    targets = {t["target"]: t for t in build_targets({"floors": floors, "nbguard": nbguard, "peers": {},
                                                      "state_bytes": 1})}
    faster = targets["until durable ≤ 1.3× the faster write floor of the floors case, buffered or O_DIRECT (info)"]
    assert round(faster["value"], 6) == round(statistics.median([1.4 / 1.0, 1.2 / 1.0, 1.2 / 1.1]), 6)
    assert faster["status"] == "PASS"  # 1.2 / 1.0 and 1.2 / 1.1 are within 1.3; round 1's 1.4 is not
    no_direct = build_targets({"floors": _case(write_fsync=[1.0] * 3), "nbguard": nbguard, "peers": {}, "state_bytes": 1})
    assert next(t for t in no_direct if t["target"] == faster["target"])["status"] == "n/a"


def test_the_save_phase_diagnostic_splits_a_real_saves_stall_and_leaves_the_guard_as_it_was(tmp_path):
    import time

    import nbguard
    from benchmarks.run import SavePhases, _timed_save, phase_lines
    from nbguard.engine import guard as guard_module

    model = torch.nn.Linear(64, 64)
    state = {"model": model}
    guard = nbguard.Guard(str(tmp_path), run="bench")
    phases = SavePhases()
    restored_at = time.perf_counter()
    for which in ("first", "next"):
        with torch.no_grad():
            model.weight.add_(1.0)
        with phases.timed(guard, which, restored_at) as sample:
            sample["stall"] = _timed_save(guard, state, which, counters=sample)[0]
    guard.close()
    first, second = phases.samples
    assert first["fresh_buffers"] > 0 and second["fresh_buffers"] == 0  # staged once, then reused
    for sample in phases.samples:
        assert sample["copy"] > 0 and sample["capture"] > 0
        assert sum(sample[k] for k in SavePhases.PHASES) <= sample["stall"]
        assert sample["since_restore"] >= 0
        assert sample["steal_ms"] >= 0 and sample["involuntary_switches"] >= 0 and sample["kdamond_ms"] >= 0
        assert sample["minor_faults"] >= 0 and sample["thread_ms:MainThread"] > 0  # the save's own thread used the CPU (Linux shows it)
        assert sample["gc_ms"] >= 0 and sample["psi_cpu_ms"] >= 0
    assert not {"flush", "drop_missing", "stage", "wait_prefault", "_copy", "save"} & (set(vars(guard._staging)) | set(vars(guard._writer)) | set(vars(guard)))
    assert guard_module.capture is nbguard.engine.capture.capture
    assert phases.summary()["first"]["slowest"] is first and phases.summary()["first"]["fastest"] is first
    assert phases.summary()["next"]["samples"] == [second]
    assert "first (1): median stall" in "\n".join(phase_lines(phases.summary()))


def test_runs_side_by_side_give_each_targets_median_range_and_the_runs_that_met_it(tmp_path, capsys):
    import json

    from benchmarks.across_runs import main

    def run(folder: str, value: float, status: str, size: float = 0.75) -> str:
        path = tmp_path / folder
        path.mkdir()
        targets = [{"target": "restore ≤ 1.3× floor", "value": value, "limit": 1.3, "status": status},
                   {"target": "gpu (info)", "value": None, "limit": 1.0, "status": "n/a"}]
        (path / "latest.json").write_text(json.dumps({"size_gib": size, "targets": targets}))
        return str(path)

    runs = [run("a", 1.2, "PASS"), run("b", 1.4, "MISS"), run("c", 1.0, "PASS")]
    assert main(runs) == 0
    table = capsys.readouterr().out
    assert "| restore ≤ 1.3× floor | 1.20 (1.00–1.40) | 2 of 3 |" in table
    assert "| gpu (info) | — | 0 of 0 |" in table
    assert main([*runs, run("d", 1.0, "PASS", size=3)]) == 2
    assert "different state sizes" in capsys.readouterr().err
