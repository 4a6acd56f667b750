"""The end-to-end throughput benchmark runs, does the same work on both sides, and reports what a
reader needs to judge it (the same process's reference steps, page faults, CPU time)."""

from __future__ import annotations

import pytest

from benchmarks.throughput import PINNED_MALLOC, measure


@pytest.mark.e2e
def test_throughput_benchmark_measures_one_pair_end_to_end():
    lines: list[str] = []
    result = measure("30s", 0.5, 1, log=lines.append)
    (pair,) = result["pairs"]
    assert pair["plain_s"] > 0 and pair["guarded_s"] > 0
    assert pair["saves_kept"] >= 1  # the guarded side really saved (at least the final save)
    assert all(r > 0 for r in pair["reference_s"]) and all(f > 0 for f in pair["minor_faults"])
    assert result["malloc"] == "pinned" and set(PINNED_MALLOC) == {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}
    assert result["lost_median"] == pair["lost"]
    assert "malloc pinned" in lines[0] and "against each process's own reference steps" in lines[1]
