"""The memory-limit benchmark really runs its children inside the limit: a state that fits saves and
resumes to the saved weights; a limit too small for it is reported as a failure, not as a pass."""

from __future__ import annotations

import os

import pytest

from benchmarks.memory_limit import MemoryCgroup, main


def _can_make_a_memory_cgroup() -> bool:
    try:
        MemoryCgroup(2**30).remove()
    except OSError:
        return False
    return True


pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not _can_make_a_memory_cgroup(), reason="needs the right to create a memory cgroup")]


def test_a_state_that_fits_saves_and_resumes_to_the_saved_weights_inside_the_limit(capsys, tmp_path):
    assert main(["--size-gib", "0.05", "--limit-gib", "2", "--folder", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "save: exit 0" in out and "resume: exit 0" in out
    assert "weights equal to the saved ones" in out
    assert os.listdir(tmp_path / "store")  # a folder named with --folder is kept, snapshot and all


def test_a_limit_too_small_for_the_state_is_a_failure(capsys, tmp_path):
    assert main(["--size-gib", "0.1", "--limit-gib", "0.35", "--folder", str(tmp_path / "store")]) == 1
    out = capsys.readouterr().out
    assert "killed: out of memory in the limit" in out and "FAILED" in out
    # the group made for the run is gone
    root = "/sys/fs/cgroup" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "/sys/fs/cgroup/memory"
    assert not [n for n in os.listdir(root) if n.startswith("nbguard-limit-")]
