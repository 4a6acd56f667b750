"""The magics in a real in-process IPython shell: capture, resume, edited cells, options, %nbguard."""

from __future__ import annotations

import os
import textwrap
from dataclasses import replace

import pytest
import torch

import nbguard

IPython = pytest.importorskip("IPython")

SETUP = textwrap.dedent("""
    import random, numpy as np, torch
    from torch import nn
    torch.manual_seed(0); random.seed(0); np.random.seed(0)
    torch.set_num_threads(1)
    X = torch.randn(96, 8); Y = (X[:, 0] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=16, shuffle=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    history = []
    total = 0.0
    crash_at = None
""")

TRAIN = textwrap.dedent("""
    for epoch in range(5):
        running = 0.0
        for i, (x, y) in enumerate(loader):
            if crash_at == (epoch, i):
                raise RuntimeError("simulated crash")
            loss = nn.functional.cross_entropy(model(x), y) + 0.01 * random.random() + 0.01 * float(np.random.rand())
            opt.zero_grad(); loss.backward(); opt.step()
            running += loss.item()
            total += 1
        sched.step()
        history.append(running)
""")


def run(sh, source: str):
    result = sh.run_cell(source)
    return result


def plain_result() -> dict:
    ns: dict = {}
    exec(SETUP, ns)
    exec(TRAIN, ns)
    return {"weights": {k: v.clone() for k, v in ns["model"].state_dict().items()},
            "opt": ns["opt"].state_dict(), "history": list(ns["history"]), "total": ns["total"]}


def same(sh, expected: dict) -> None:
    ns = sh.user_ns
    for key, value in ns["model"].state_dict().items():
        assert torch.equal(value, expected["weights"][key]), key
    assert ns["history"] == expected["history"]
    assert ns["total"] == expected["total"]
    opt_state = ns["opt"].state_dict()["state"]
    for index, state in expected["opt"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(opt_state[index][name], tensor), (index, name)


def test_uninterrupted_cell_matches_plain_run_and_saves_final_snapshot(shell, capsys):
    expected = plain_result()
    run(shell, SETUP)
    result = run(shell, "%%checkpointed --every 1h\n" + TRAIN)
    assert result.success
    same(shell, expected)
    out = capsys.readouterr()
    assert "captured:" in out.out + out.err
    snaps = nbguard.Catalog(os.environ["NBGUARD_DIR"]).snapshots()
    assert snaps and "final" in snaps[0].tags and snaps[0].position.get("completed") is True


@pytest.mark.parametrize("crash_at", [(0, 0), (1, 3), (3, 5), (4, 5)])
def test_crash_then_rerun_resumes_exactly(shell, crash_at, capsys):
    expected = plain_result()
    run(shell, SETUP)
    shell.user_ns["crash_at"] = crash_at
    result = run(shell, "%%checkpointed --every-iter 1\n" + TRAIN)
    assert not result.success or crash_at is None
    # A fresh kernel: everything is rebuilt by re-running the notebook from the top.
    shell.user_ns.clear()
    run(shell, SETUP)
    result = run(shell, "%%checkpointed --every-iter 1\n" + TRAIN)
    assert result.success
    out = capsys.readouterr().out
    if crash_at != (0, 0):
        assert "resumed from snapshot" in out
    same(shell, expected)


def test_completed_run_is_not_trained_again(shell, capsys):
    expected = plain_result()
    run(shell, SETUP)
    run(shell, "%%checkpointed\n" + TRAIN)
    shell.user_ns.clear()
    run(shell, SETUP)
    run(shell, "%%checkpointed\n" + TRAIN)
    out = capsys.readouterr().out
    assert "already finished" in out and "--fresh" in out
    same(shell, expected)


def plain_result_of(train: str) -> dict:
    ns: dict = {}
    exec(SETUP, ns)
    exec(train, ns)
    return {"weights": {k: v.clone() for k, v in ns["model"].state_dict().items()},
            "opt": ns["opt"].state_dict(), "history": list(ns["history"]), "total": ns["total"]}


def refused(result, *words: str) -> str:
    """The cell ended in a one-line UsageError (so "Run all" stops there) naming ``words``."""
    from IPython.core.error import UsageError

    assert not result.success and isinstance(result.error_in_exec, UsageError), result.error_in_exec
    text = str(result.error_in_exec)
    assert text.startswith("nbguard: ") and "\n" not in text, text
    for word in words:
        assert word in text, (word, text)
    return text


@pytest.mark.parametrize("crash_at", [(2, 1), (3, 0)])
def test_edited_cell_continues_and_equals_a_plain_run_of_the_new_cell(shell, crash_at, capsys):
    longer = TRAIN.replace("range(5)", "range(8)").replace("running += loss.item()", "running += loss.item()  # longer")
    expected = plain_result_of(longer)
    run(shell, SETUP)
    shell.user_ns["crash_at"] = crash_at
    assert not run(shell, "%%checkpointed --name r --every-iter 1\n" + TRAIN).success
    shell.user_ns.clear()
    run(shell, SETUP)
    capsys.readouterr()
    assert run(shell, "%%checkpointed --name r --every-iter 1\n" + longer).success
    out = capsys.readouterr().out
    assert "resumed from snapshot" in out and "the cell changed since this snapshot" in out, out
    same(shell, expected)
    assert len(shell.user_ns["history"]) == 8


def test_edited_cell_whose_loops_differ_stops_with_both_ways_on(shell):
    run(shell, SETUP)
    shell.user_ns["crash_at"] = (2, 1)
    run(shell, "%%checkpointed --name r --every-iter 1\n" + TRAIN)
    shell.user_ns.clear()
    run(shell, SETUP)
    flat = "for step, (x, y) in enumerate(loader):\n    loss = nn.functional.cross_entropy(model(x), y)\n"
    text = refused(run(shell, "%%checkpointed --name r\n" + flat), "--resume-from", "--fresh", "loops nest differently")
    assert "Traceback" not in text
    assert shell.user_ns["history"] == [] and "loss" not in shell.user_ns  # nothing trained over the progress
    assert run(shell, "%%checkpointed --name r --fresh\n" + flat).success


def test_resume_from_applies_once(shell, capsys):
    expected = plain_result()
    run(shell, SETUP)
    shell.user_ns["crash_at"] = (3, 2)
    run(shell, "%%checkpointed --name r --every-iter 1\n" + TRAIN)
    snaps = nbguard.Catalog(os.environ["NBGUARD_DIR"]).snapshots("r")
    older = snaps[-1].id  # not the newest: --resume-from is the way to go back to it
    shell.user_ns.clear()
    run(shell, SETUP)
    assert run(shell, f"%%checkpointed --name r --every-iter 1 --resume-from {older}\n" + TRAIN).success
    same(shell, expected)
    capsys.readouterr()
    shell.user_ns.clear()
    run(shell, SETUP)
    assert run(shell, f"%%checkpointed --name r --every-iter 1 --resume-from {older}\n" + TRAIN).success
    out = capsys.readouterr().out
    assert f"--resume-from {older} was applied in an earlier run" in out and "already finished" in out, out
    same(shell, expected)


def test_every_refusal_raises_one_line_so_run_all_stops(shell, tmp_path):
    run(shell, SETUP)
    refused(run(shell, "%%checkpointed --evry 5m\n" + TRAIN), "unrecognized arguments: --evry 5m", "%%checkpointed?")
    refused(run(shell, "%%checkpointed --every soon\npass"), "--every 'soon'")
    refused(run(shell, "%%checkpointed --every 1e-9s\npass"), "at least 0.1 s")
    refused(run(shell, "%%checkpointed --state nothere\nx = 1"), "nothere")
    refused(run(shell, "%%checkpointed --dir ''\npass"), "--dir ''")
    refused(run(shell, "%%checkpointed --budget soon\npass"), "--budget 'soon'")
    refused(run(shell, "%%checkpointed --dir 'unclosed\npass"), "quotation")
    assert shell.user_ns["history"] == []
    with pytest.raises(IPython.core.error.UsageError, match="unknown command"):
        shell.run_line_magic("nbguard", "lsit")


def test_dir_is_parsed_like_a_shell_and_a_new_dir_is_described(shell, tmp_path, capsys):
    run(shell, SETUP)
    capsys.readouterr()
    assert run(shell, "%%checkpointed --dir 'with space/ünïcødé'\nfor epoch in range(2):\n    history.append(epoch)").success
    out = capsys.readouterr().out
    folder = tmp_path / "with space" / "ünïcødé"
    assert nbguard.Catalog(str(folder)).snapshots(), sorted(os.listdir(tmp_path))
    assert not any("'" in name for name in os.listdir(tmp_path))
    assert f"snapshots of this cell go to {folder} (on this machine's disk)" in out, out
    run(shell, "%%checkpointed --dir 'with space/ünïcødé'\nfor epoch in range(2):\n    history.append(epoch)")
    assert "go to" not in capsys.readouterr().out  # said once per place


def test_shape_mismatch_raises_and_names_the_way_out(shell):
    run(shell, SETUP)
    shell.user_ns["crash_at"] = (1, 2)
    run(shell, "%%checkpointed --name r --every-iter 1\n" + TRAIN)
    shell.user_ns.clear()
    run(shell, SETUP.replace("nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2)",
                             "nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2)"))
    fresh = [p.clone() for p in shell.user_ns["model"].parameters()]
    text = refused(run(shell, "%%checkpointed --name r --every-iter 1\n" + TRAIN + "print('AFTER')"), "--fresh",
                   "build the same model")
    assert "shape" in text
    assert shell.user_ns["history"] == []  # no epoch trained on an unrestored model
    assert all(torch.equal(a, b) for a, b in zip(fresh, shell.user_ns["model"].parameters(), strict=True))


def test_budget_saves_makes_durable_and_stops_then_a_new_session_continues(shell, capsys):
    slow = TRAIN.replace("total += 1", "total += 1; time.sleep(0.05)")
    expected = plain_result_of(slow.replace("time.sleep(0.05)", "pass"))
    run(shell, SETUP + "import time\n")
    text = refused(run(shell, "%%checkpointed --name r --every 1h --budget 1s\n" + slow), "time budget",
                   "continues from there")
    assert "not confirmed" not in text
    newest = nbguard.Catalog(os.environ["NBGUARD_DIR"]).snapshots("r")[0]
    assert "budget" in newest.tags and not newest.position.get("completed")
    assert newest.id in text and newest.label in text
    assert 0 < len(shell.user_ns["history"]) < 5
    shell.user_ns.clear()
    run(shell, SETUP + "import time\n")
    assert run(shell, "%%checkpointed --name r --every 1h\n" + slow).success
    same(shell, expected)


def test_positions_read_as_people_count(shell):
    run(shell, SETUP + "import time\n")
    slow = TRAIN.replace("total += 1", "total += 1; time.sleep(0.02)")
    assert run(shell, "%%checkpointed --name r --every 0.1s --keep 50\n" + slow).success
    labels = [s.label for s in nbguard.Catalog(os.environ["NBGUARD_DIR"]).snapshots("r")]
    assert labels[0] == "finished 5 of 5 epochs"
    import re

    middle = [label for label in labels[1:] if re.fullmatch(r"in epoch [1-5], after batch [1-6] of 6", label)]
    ends = [label for label in labels[1:] if re.fullmatch(r"after epoch [1-5] of 5", label)]
    assert middle and len(middle) + len(ends) == len(labels) - 1, labels


def test_finished_run_run_again_adds_no_second_final_snapshot(shell, capsys):
    run(shell, SETUP)
    run(shell, "%%checkpointed --name r\n" + TRAIN)
    shell.user_ns.clear()
    run(shell, SETUP)
    run(shell, "%%checkpointed --name r\n" + TRAIN)
    assert "already finished" in capsys.readouterr().out
    import nbguard.training.session as sessions

    sessions.current().at_exit()
    snaps = nbguard.Catalog(os.environ["NBGUARD_DIR"]).snapshots("r")
    assert len(snaps) == 1 and snaps[0].label == "finished 5 of 5 epochs", [(s.tags, s.label) for s in snaps]


def test_nbguard_line_magic_status_save_list_restore_config(shell, capsys):
    run(shell, SETUP)
    run(shell, "%%checkpointed\n" + TRAIN)
    capsys.readouterr()
    shell.run_line_magic("nbguard", "status")
    assert "guarded run" in capsys.readouterr().out
    shell.run_line_magic("nbguard", "save --note hello")
    assert "being written" in capsys.readouterr().out
    shell.run_line_magic("nbguard", "list")
    assert "[manual]" in capsys.readouterr().out
    before = {k: v.clone() for k, v in shell.user_ns["model"].state_dict().items()}
    with torch.no_grad():
        for p in shell.user_ns["model"].parameters():
            p.zero_()
    shell.run_line_magic("nbguard", "restore latest")
    assert "restored" in capsys.readouterr().out
    for k, v in shell.user_ns["model"].state_dict().items():
        assert torch.equal(v, before[k])
    shell.run_line_magic("nbguard", "config every=10m keep=5")
    assert "keep 5" in capsys.readouterr().out


def test_load_twice_is_harmless_and_unload_removes_magics(shell):
    shell.run_line_magic("load_ext", "nbguard")
    assert "checkpointed" in shell.magics_manager.magics["cell"]
    shell.run_line_magic("unload_ext", "nbguard")
    assert "checkpointed" not in shell.magics_manager.magics["cell"]
    shell.run_line_magic("load_ext", "nbguard")


def test_loader_with_its_own_generator_resumes_exactly(shell):
    setup = SETUP.replace("shuffle=True)", "shuffle=True, generator=torch.Generator().manual_seed(7))")
    ns: dict = {}
    exec(setup, ns)
    exec(TRAIN, ns)
    expected = {"weights": {k: v.clone() for k, v in ns["model"].state_dict().items()},
                "opt": ns["opt"].state_dict(), "history": list(ns["history"]), "total": ns["total"]}
    run(shell, setup)
    shell.user_ns["crash_at"] = (2, 3)
    run(shell, "%%checkpointed --every-iter 1\n" + TRAIN)
    shell.user_ns.clear()
    run(shell, setup)
    assert run(shell, "%%checkpointed --every-iter 1\n" + TRAIN).success
    same(shell, expected)


def test_ipython_syntax_inside_the_cell_works(shell, capsys):
    run(shell, SETUP)
    result = run(shell, "%%checkpointed\nfor epoch in range(2):\n    %time history.append(epoch)\n")
    assert result.success and shell.user_ns["history"] == [0, 1]


def test_panel_header_and_list_use_the_same_plain_words(shell, tmp_path, monkeypatch, capsys):
    pytest.importorskip("ipywidgets")
    shell.run_line_magic("unload_ext", "nbguard")
    monkeypatch.delenv("NBGUARD_DIR")
    shell.run_line_magic("load_ext", "nbguard")
    run(shell, SETUP)
    assert run(shell, "%%checkpointed --best history\nfor epoch in range(2):\n    total += 1.5").success
    capsys.readouterr()
    shell.run_line_magic("nbguard", "list")
    listed = capsys.readouterr().out
    assert " on disk " in listed and " local " not in listed, listed
    panel = shell.run_line_magic("nbguard", "panel")
    header = panel.header.value
    folder = os.path.join(str(tmp_path), "nbguard-snapshots")
    assert f"stored in</span> {folder}" in header and "in in" not in header and "(in the current folder)" in header
    assert "best" not in panel.table.value  # 'total' is an accumulator, and --best history is no number


def test_load_ext_on_kaggle_shows_the_session_limit_and_cells_get_it(shell, monkeypatch, capsys):
    shell.run_line_magic("unload_ext", "nbguard")
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    shell.run_line_magic("load_ext", "nbguard")
    out = capsys.readouterr().out
    assert "Kaggle ends a session after 12 h" in out and "--budget" in out, out
    import nbguard.training.session as sessions

    session = sessions.current()
    assert session.budget_for(session.defaults).seconds == 11.5 * 3600
    assert session.budget_for(replace(session.defaults, budget=60.0)).why == "--budget"
    assert session.budget_for(replace(session.defaults, budget=0.0)) is None  # --budget off


def test_an_edit_that_ends_before_the_snapshot_stops_with_both_ways_on(shell):
    run(shell, SETUP)
    shell.user_ns["crash_at"] = (3, 1)
    run(shell, "%%checkpointed --name r --every-iter 1\n" + TRAIN)
    shell.user_ns.clear()
    run(shell, SETUP)
    shorter = TRAIN.replace("range(5)", "range(2)")
    refused(run(shell, "%%checkpointed --name r --every-iter 1\n" + shorter), "--resume-from", "--fresh")
    assert shell.user_ns["history"] == []


def test_shutdown_after_only_reading_the_weights_adds_no_second_snapshot(shell):
    """Reading weights through NumPy (an evaluation, a digest) may have changed them as far as torch
    can tell; the shutdown snapshot compares bytes and does not repeat an identical state."""
    run(shell, SETUP)
    assert run(shell, "%%checkpointed --name r\n" + TRAIN).success
    run(shell, "digest = sum(float(v.numpy().sum()) for v in model.state_dict().values())")
    import nbguard.training.session as sessions

    sessions.current().at_exit()
    snaps = nbguard.Catalog(os.environ["NBGUARD_DIR"]).snapshots("r")
    assert [s.tags for s in snaps] == [("final",)]
    run(shell, "with torch.no_grad():\n    model[0].weight.numpy()[0, 0] += 1.0")  # a real change, through NumPy
    sessions.current().at_exit()
    assert [s.tags for s in nbguard.Catalog(os.environ["NBGUARD_DIR"]).snapshots("r")] == [("shutdown",), ("final",)]


def test_budget_waits_until_the_last_snapshot_is_verified_in_drive(shell, tmp_path, monkeypatch):
    import json

    from tests.drive_emulator import DriveEmulator

    emulator = DriveEmulator().start()
    try:
        monkeypatch.setenv("NBGUARD_DRIVE_CREDENTIALS", json.dumps(emulator.authorized_user_info()))
        monkeypatch.setenv("NBGUARD_DRIVE_API_ROOT", emulator.url)
        monkeypatch.setenv("NBGUARD_STAGING", str(tmp_path / "staging"))
        emulator.inject("slow", times=10**6, delay=0.05)  # Drive lags behind the saves
        url = "gdrive://nbguard/budget"
        run(shell, SETUP + "import time\n")
        slow = TRAIN.replace("total += 1", "total += 1; time.sleep(0.05)")
        refused(run(shell, f"%%checkpointed --dir {url} --name r --every 1h --every-iter 1 --budget 1.5s\n" + slow),
                "time budget")
        import nbguard.training.session as sessions

        newest = sessions.current().guards[(url, "r")].catalog.snapshots("r")[0]
        assert "budget" in newest.tags and newest.state == "verified", (newest.tags, newest.state)
    finally:
        from nbguard.stores import registry as store_module

        for store in store_module.SHARED.staged_stores.values():
            store.close(5)
        store_module.SHARED.staged_stores.clear()
        emulator.stop()


def test_a_finished_run_trains_on_when_the_cell_asks_for_more_epochs(shell, capsys):
    longer = TRAIN.replace("range(5)", "range(8)")
    expected = plain_result_of(longer)
    run(shell, SETUP)
    assert run(shell, "%%checkpointed --name r\n" + TRAIN).success
    shell.user_ns.clear()
    run(shell, SETUP)
    capsys.readouterr()
    assert run(shell, "%%checkpointed --name r\n" + longer).success
    out = capsys.readouterr().out
    assert "finished 5 of 5 epochs" in out and "the cell changed since this snapshot" in out, out
    same(shell, expected)
    assert nbguard.Catalog(os.environ["NBGUARD_DIR"]).snapshots("r")[0].label == "finished 8 of 8 epochs"


def test_the_final_snapshot_supersedes_an_identical_last_iteration_snapshot(shell):
    run(shell, SETUP)
    assert run(shell, "%%checkpointed --name r --every-iter 1 --keep 3\n" + TRAIN).success
    labels = [s.label for s in nbguard.Catalog(os.environ["NBGUARD_DIR"]).snapshots("r")]
    assert labels == ["finished 5 of 5 epochs", "after epoch 4 of 5", "after epoch 3 of 5"], labels


def test_gc_magic_says_what_it_removed_and_what_it_kept(shell, capsys):
    run(shell, SETUP)
    run(shell, "%%checkpointed --every-iter 1\n" + TRAIN)
    capsys.readouterr()
    shell.run_line_magic("nbguard", "gc")
    out = capsys.readouterr().out
    assert "nbguard: removed 0 unused blob(s) and 0 leftover file(s), 0 B freed; kept 0 unused file(s)" in out, out
