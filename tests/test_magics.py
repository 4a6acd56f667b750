"""The magics in a real in-process IPython shell: capture, resume, edited cells, options, %nbguard."""

from __future__ import annotations

import os
import textwrap

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


@pytest.fixture
def shell(tmp_path, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NBGUARD_DIR", str(tmp_path / "snaps"))
    sh = InteractiveShell.instance()
    sh.user_ns.clear()
    sh.run_line_magic("load_ext", "nbguard")
    yield sh
    sh.run_line_magic("unload_ext", "nbguard")
    sh.user_ns.clear()
    InteractiveShell.clear_instance()


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


def test_edited_cell_snapshot_is_not_applied_silently(shell, capsys):
    run(shell, SETUP)
    shell.user_ns["crash_at"] = (2, 1)
    run(shell, "%%checkpointed --name r --every-iter 1\n" + TRAIN)
    shell.user_ns.clear()
    run(shell, SETUP)
    edited = TRAIN.replace("range(5)", "range(6)")
    run(shell, "%%checkpointed --name r --every-iter 1\n" + edited)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "earlier version of this cell" in text and "--resume-from" in text
    assert len(shell.user_ns["history"]) == 6  # trained from scratch


def test_bad_options_give_one_clear_line(shell, capsys):
    run(shell, SETUP)
    run(shell, "%%checkpointed --every soon\npass")
    assert "--every 'soon'" in capsys.readouterr().out
    run(shell, "%%checkpointed --state nothere\nx = 1")
    assert "nothere" in capsys.readouterr().out


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
