"""The end-to-end throughput benchmark runs, does the same work on both sides, and reports what a
reader needs to judge it (the same process's reference steps, page faults, CPU time)."""

from __future__ import annotations

import pytest

from benchmarks.throughput import PINNED_MALLOC, drift_free_seconds, lost_drift_free, measure


def _run(steps: list[float], outside: float = 0.5) -> dict:
    return {"step_s": steps, "outside_loop_s": outside, "seconds": outside + sum(steps)}


def test_drift_free_seconds_drop_a_slow_machine_but_keep_what_was_added():
    """A minute at 10 % lower speed is the machine, not the guard: it no longer counts. A 0.4 s
    stall and 0.3 s more outside the loop are what the guard added: they count in full."""
    steady = [0.1] * 1200  # two minutes of 100 ms steps
    slow_minute = [0.1] * 600 + [0.11] * 600
    assert sum(slow_minute) - sum(steady) == pytest.approx(6.0)  # end to end: a 5 % loss
    assert drift_free_seconds(_run(slow_minute), 0.1) == pytest.approx(drift_free_seconds(_run(steady), 0.1), abs=0.2)

    guarded = list(slow_minute)
    guarded[300] += 0.4  # a save's stall
    for i in range(900, 905):
        guarded[i] += 0.02  # the writer beside five steps
    lost = lost_drift_free(_run(steady), _run(guarded, outside=0.8))
    added = 0.4 + 5 * 0.02 + 0.3
    assert lost == pytest.approx(added / (0.5 + 120.0), abs=0.2 / 120)


def test_at_saves_counts_only_the_steps_around_the_moments_given():
    """Jitter far from any save is the machine's; a stall within the span of a save is the guard's."""
    plain = [0.1] * 1200
    guarded = list(plain)
    guarded[300] += 0.4  # a stall at 30 s, where a save began
    guarded[700] += 0.5  # a hiccup of the host at 70 s, far from any save
    lost = lost_drift_free(_run(plain), _run(guarded), around=[29.95])
    assert lost == pytest.approx(0.4 / 120.5, rel=0.05)
    assert lost_drift_free(_run(plain), _run(guarded)) == pytest.approx(0.9 / 120.5, rel=0.05)


def test_drift_free_seconds_count_the_steps_at_the_pace_given():
    run = _run([0.2, 0.2, 0.2, 0.2], outside=1.0)
    assert drift_free_seconds(run, 0.1) == pytest.approx(1.0 + 4 * 0.1)


@pytest.mark.e2e
def test_throughput_benchmark_measures_one_pair_end_to_end():
    lines: list[str] = []
    result = measure("30s", 0.5, 1, log=lines.append, null_pairs=1)
    (pair,) = result["pairs"]
    assert len(result["null"]) == len(result["null_drift_free"]) == 1 and "null pair" in lines[1]
    assert pair["outside_loop_s"][1] > 0 and result["lost_drift_free_median"] == pair["lost_drift_free"]
    assert pair["save_at"] and result["lost_at_saves_median"] == pair["lost_at_saves"]  # saves were timed
    assert pair["plain_s"] > 0 and pair["guarded_s"] > 0
    assert pair["saves_kept"] >= 1  # the guarded side really saved (at least the final save)
    assert all(r > 0 for r in pair["reference_s"]) and all(f > 0 for f in pair["minor_faults"])
    assert result["malloc"] == "pinned" and set(PINNED_MALLOC) == {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}
    assert result["lost_median"] == pair["lost"]
    assert "malloc pinned" in lines[0] and "against each process's own reference steps" in lines[2]
    assert "drift-free" in lines[2]


@pytest.mark.e2e
def test_side_by_side_layout_runs_both_sides_at_once_one_cpu_each():
    """Each side is pinned to its own CPU with one torch thread, the CPUs swap between pairs, and a
    plain/plain pair first shows the layout's own noise."""
    from benchmarks.throughput import measure_side_by_side, side_by_side_cpus

    lines: list[str] = []
    result = measure_side_by_side("30s", 0.5, 1, null_pairs=1, log=lines.append, warm_up=False,
                                  calibrate_steps=3)
    (pair,) = result["pairs"]
    cpus = list(side_by_side_cpus())
    assert len(result["null"]) == 1 and "null pair" in lines[1]
    assert pair["cpus"] == cpus[::-1]  # the null pair took the first order
    assert pair["ran_on"] == [[cpu] for cpu in pair["cpus"]] and pair["threads"] == [1, 1]
    assert pair["saves_kept"] >= 1 and pair["plain_s"] > 0 and pair["guarded_s"] > 0
    assert result["layout"] == "side-by-side" and result["lost_median"] == pair["lost"]


@pytest.mark.e2e
def test_the_guarded_side_saves_inside_its_loop(tmp_path):
    """The child runs from a file: under ``python -c`` nbguard has no source to rewrite the loop
    from, and the guarded run saved only after its loop (what this benchmark measured until stop 26)."""
    from benchmarks.throughput import _check_saved_in_loop, _child, _in_loop

    run = _child("guarded", str(tmp_path / "store"), 40, "1s")
    assert _in_loop(run) >= 1
    _check_saved_in_loop(run, "1s")


def test_a_guarded_run_without_a_save_in_its_loop_is_refused():
    from benchmarks.throughput import _check_saved_in_loop

    ended_only = {**_run([0.1] * 100), "save_at": [10.2]}  # 10 s of steps, one save after the loop
    with pytest.raises(RuntimeError, match="never saved inside its loop"):
        _check_saved_in_loop(ended_only, "2s")
    _check_saved_in_loop(ended_only, "30s")  # shorter than its cadence: nothing was due


def test_a_run_planned_past_its_cadence_that_ended_before_it_is_refused():
    """Stop 32's 5-minute run: planned for 310 s, its steps ran faster than calibrated, it trained
    264 s and held no timer save, and it passed as if it had measured one."""
    from benchmarks.throughput import _check_saved_in_loop

    ended_early = {**_run([0.1] * 100), "save_at": [10.2]}  # 10 s of steps, cadence 12 s
    with pytest.raises(RuntimeError, match="faster than calibrated"):
        _check_saved_in_loop(ended_early, "12s", planned_s=13)
    _check_saved_in_loop(ended_early, "12s", planned_s=11)  # planned shorter: fixed costs only, as asked


def test_seconds_too_close_to_the_cadence_are_refused_before_anything_runs(capsys):
    from benchmarks.throughput import check_seconds, main

    with pytest.raises(SystemExit):
        main(["--cadence", "5m", "--seconds", "310"])
    assert "too close to --cadence 5m" in capsys.readouterr().err
    check_seconds("5m", 400)  # a margin
    check_seconds("5m", 250)  # shorter than the cadence: no timer save meant
    check_seconds("30s", 120)


def test_two_runs_must_have_trained_the_same_steps_to_nearly_the_same_loss():
    from benchmarks.throughput import check_same_work

    plain = {**_run([0.1] * 100), "final_loss": 2.190335988998413}
    check_same_work(plain, {**plain, "final_loss": 2.190005302429199})  # what two plain processes end on here
    learned = {**plain, "final_loss": 2.4028119582908403e-07}  # a 5-minute pair, both sides near zero
    check_same_work(learned, {**learned, "final_loss": 2.63564260194471e-07})
    with pytest.raises(RuntimeError, match="99 steps"):
        check_same_work(plain, {**_run([0.1] * 99), "final_loss": plain["final_loss"]})
    with pytest.raises(RuntimeError, match="final loss"):
        check_same_work(plain, {**plain, "final_loss": 2.3})
