"""Bad user input: each mistake gets ONE clear line that says what to do, never a traceback.

Through a real in-process IPython shell (the magics), the Python API, and the command line
(``python -m nbguard.cli``: exit status 2 and one line on stderr). Hostile files and fuzzing are
tests/test_engine_hostile.py's and tests/test_fuzz_loader.py's; restoring into objects of another
shape through the Python API is test_engine_hostile's ``test_a_mismatch_raises_before_anything_is_changed``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import nbguard
from nbguard import Guard, RestoreError, SnapshotError, UsageError
from nbguard.cli import main as cli_main
from tests import crash_harness as ch

IPython = pytest.importorskip("IPython")

SETUP = textwrap.dedent("""
    import torch
    from torch import nn
    torch.manual_seed(0)
    model = nn.Linear(8, WIDTH)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    crash = CRASH
""")

CELL = textwrap.dedent("""
    for epoch in range(4):
        if crash and epoch == 2:
            raise RuntimeError("simulated crash")
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        history.append(loss.item())
""")


def setup(width: int = 16, crash: bool = False) -> str:
    return SETUP.replace("WIDTH", str(width)).replace("CRASH", str(crash))


@pytest.fixture
def shell(tmp_path, monkeypatch):
    yield from ch.ipython_shell(tmp_path, monkeypatch)


def said(capfd) -> list[str]:
    """Every non-empty line the cell printed (stdout and stderr)."""
    out = capfd.readouterr()
    return [line for line in (out.out + out.err).splitlines() if line.strip()]


def one_clear_line(lines: list[str], *must: str) -> str:
    assert not any("Traceback" in line or "-----" in line for line in lines), "\n".join(lines)
    assert len(lines) == 1, "\n".join(lines)
    for word in must:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(("options", "must"), [
    ("--every soon", ["--every 'soon'", "use a duration such as 30s, 10m or 1h"]),
    ("--every 0", ["--every '0'", "at least 0.1 s"]),
    ("--keep 0", ["--keep", "at least 1"]),
    ("--keep -3", ["--keep", "at least 1"]),
    ("--every-iter 0", ["--every-iter", "at least 1"]),
    ("--best 3x", ["--best needs a variable name", "e.g. val_loss:min", "'3x'"]),
    ("--best loss:median", ["min or max"]),
    ("--name 'no spaces'", ["invalid run name", "letters, digits"]),
    ("--dir foo://x", ["unknown store URL scheme 'foo'", "use a folder path"]),
    ("--state 'a b'", ["not variable names", "separated by commas"]),
])
def test_wrong_magic_options_give_one_clear_line_and_run_nothing(shell, capfd, options, must):
    shell.run_cell(setup())
    capfd.readouterr()
    result = shell.run_cell(f"%%checkpointed {options}\n" + CELL)
    line = one_clear_line(said(capfd), "nbguard:", *must)
    assert not result.success, line  # a refusal raises, so "Run all" stops at this cell
    assert shell.user_ns["history"] == [], "the cell ran despite the bad option"


@pytest.mark.parametrize(("options", "must"), [
    ("--evry 5m", ["unrecognized arguments: --evry 5m"]),
    ("--every-iter x", ["--every-iter", "invalid int value: 'x'"]),
])
def test_unknown_flags_give_one_line_without_a_traceback(shell, capfd, options, must):
    shell.run_cell(setup())
    capfd.readouterr()
    shell.run_cell(f"%%checkpointed {options}\n" + CELL)
    one_clear_line(said(capfd), "%%checkpointed?", *must)
    assert shell.user_ns["history"] == []


def test_an_unknown_flag_says_where_the_options_are(shell, capfd):
    shell.run_cell(setup())
    capfd.readouterr()
    shell.run_cell("%%checkpointed --evry 5m\n" + CELL)
    line = one_clear_line(said(capfd))
    assert "--every" in line.replace("--evry", "") or "checkpointed?" in line, line


def test_a_store_path_that_is_a_file_gives_one_clear_line(shell, capfd, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    shell.run_cell(setup())
    capfd.readouterr()
    shell.run_cell(f"%%checkpointed --dir {afile}\n" + CELL)
    one_clear_line(said(capfd), "is a file, not a folder", "pass a folder for snapshots")
    assert afile.read_text() == "not a folder"


def test_a_best_variable_that_does_not_exist_is_said_once_and_training_runs(shell, capfd):
    shell.run_cell(setup())
    capfd.readouterr()
    result = shell.run_cell("%%checkpointed --best nothere --every-iter 1\n" + CELL)
    assert result.success
    lines = said(capfd)
    about = [line for line in lines if "nothere" in line]
    assert len(about) == 1, lines
    assert "there is no variable 'nothere'" in about[0] and "once the cell assigns it" in about[0]
    assert len(shell.user_ns["history"]) == 4
    assert len(nbguard.Catalog(os.environ["NBGUARD_DIR"]).snapshots()) >= 2


def test_a_state_name_that_does_not_exist_gives_one_clear_line(shell, capfd):
    shell.run_cell(setup())
    capfd.readouterr()
    shell.run_cell("%%checkpointed --state nothere\n" + CELL)
    one_clear_line(said(capfd), "nothere", "Check the spelling")


def test_resuming_into_a_model_of_another_shape_gives_one_clear_line(shell, capfd):
    shell.run_cell(setup(width=16, crash=True))
    shell.run_cell("%%checkpointed --every-iter 1 --name shape\n" + CELL)  # saves, then crashes at epoch 2
    shell.run_cell(setup(width=32))
    capfd.readouterr()
    shell.run_cell("%%checkpointed --every-iter 1 --name shape\n" + CELL)
    lines = said(capfd)
    one_clear_line([line for line in lines if not line.startswith("nbguard: captured")],
                   "has shape [16, 8] in the snapshot but [32, 8]", "build the model with the same sizes")


def test_restoring_a_snapshot_into_a_model_of_another_shape_by_hand_gives_one_clear_line(shell, capfd):
    shell.run_cell(setup(width=16))
    shell.run_cell("%%checkpointed --every-iter 1\n" + CELL)
    shell.run_cell(setup(width=32))
    before = shell.user_ns["model"].weight.detach().clone()
    capfd.readouterr()
    shell.run_cell("%nbguard restore latest")  # a refusal raises: run as a cell, it prints one line
    one_clear_line(said(capfd), "has shape [16, 8] in the snapshot but [32, 8]", "build the model with the same sizes")
    assert bool((shell.user_ns["model"].weight == before).all()), "the live model was changed"


@pytest.mark.parametrize(("line", "must"), [
    ("bogus", ["unknown command 'bogus'", "use status, save, list"]),
    ("restore nosuchid", ["no snapshot"]),
    ("config every=soon", ["use a duration such as 30s"]),
    ("config keep=0", ["keep must be at least 1"]),
    ("config color=red", ["unknown setting(s) color", "use best, budget, dir, every"]),
    ("config every", ["KEY=VALUE"]),
    ("save --bad", ["usage: %nbguard save [--note TEXT]"]),
])
def test_wrong_nbguard_commands_give_one_clear_line(shell, capfd, line, must):
    shell.run_cell(setup())
    capfd.readouterr()
    assert not shell.run_cell(f"%nbguard {line}").success  # a refusal raises, so "Run all" stops
    one_clear_line(said(capfd), "nbguard:", *must)


def test_saving_with_nothing_to_save_gives_one_clear_line(shell, capfd):
    capfd.readouterr()
    shell.run_cell("%nbguard save")
    one_clear_line(said(capfd), "nothing to save yet", "run the cells that create them first")


# -- the Python API ---------------------------------------------------------------------------------------------
def api_cases(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    return [
        (lambda: Guard("foo://x"), UsageError, ["unknown store URL scheme 'foo'", "use a folder path"]),
        (lambda: Guard(str(afile)), UsageError, ["is a file, not a folder", "pass a folder"]),
        (lambda: Guard(str(tmp_path / "s"), keep=0), UsageError, ["keep must be", "at least 1"]),
        (lambda: Guard(str(tmp_path / "s"), best="3x"), UsageError, ["--best needs a variable name"]),
        (lambda: Guard(str(tmp_path / "s"), run="no spaces"), UsageError, ["invalid run name", "letters, digits"]),
        (lambda: Guard(str(tmp_path / "s")).save({"x": 1}, metrics={"loss": "high"}), UsageError,
         ["metric 'loss' must be a number"]),
        (lambda: nbguard.load(str(tmp_path / "empty")), SnapshotError, ["no snapshots in", "train with autosave"]),
    ]


def test_wrong_arguments_to_the_python_api_raise_one_clear_nbguard_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NBGUARD_DRIVE_CREDENTIALS", raising=False)
    for call, kind, must in api_cases(tmp_path):
        with pytest.raises(kind) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and message, message
        for word in must:
            assert word in message, message


def test_restoring_into_a_model_of_another_shape_through_the_api_says_what_to_do(tmp_path):
    import torch

    guard = Guard(str(tmp_path / "s"), run="r", report=None)
    guard.save({"model": torch.nn.Linear(8, 16)}, wait=True).result()
    other = torch.nn.Linear(8, 32)
    with pytest.raises(RestoreError) as info:
        guard.restore({"model": other})
    assert "build the model with the same sizes" in str(info.value) and "\n" not in str(info.value)


# -- the command line ---------------------------------------------------------------------------------------------
def cli(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = cli_main(list(argv))
    out = capsys.readouterr()
    return code, [line for line in out.err.splitlines() if line.strip()], out.out


@pytest.fixture
def snaps(tmp_path):
    import torch

    guard = Guard(str(tmp_path / "snaps"), run="r", report=None)
    guard.save({"model": torch.nn.Linear(2, 2)}, wait=True).result()
    return tmp_path / "snaps"


def test_cli_errors_are_exit_2_and_one_line_on_stderr(capsys, tmp_path, snaps):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["ls", str(tmp_path / "nonexistent")], ["does not exist", "pass the folder"]),
        (["ls", str(afile)], ["is a file", "pass the folder"]),
        (["ls", "foo://x"], ["unknown store URL scheme 'foo'"]),
        (["verify", str(tmp_path / "nothing-here")], ["does not exist"]),
        (["ls", str(snaps / "runs")], ["no nbguard snapshots in", "NBGUARD_DIR"]),
        (["show", "nosuch", "--dir", str(snaps)], ["no snapshot 'nosuch'", "nbguard ls"]),
        (["export", "latest", "--module", "nosuch", "--out", str(tmp_path / "x.st"), "--dir", str(snaps)],
         ["has no 'nosuch'", "it has: model"]),
    ]
    for argv, must in cases:
        code, err, out = cli(capsys, *argv)
        assert code == 2, (argv, code, err)
        assert len(err) == 1 and err[0].startswith("nbguard: error: "), (argv, err)
        assert out == ""
        for word in must:
            assert word in err[0], (argv, err[0])


@pytest.mark.parametrize("argv", [["ls", "--bogus"], ["gc", "--grace", "soon"], ["frobnicate"]])
def test_cli_usage_errors_exit_2_with_argparse_usage_and_one_error_line(capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[0].startswith("usage: nbguard") and "error:" in err[-1] and len(err) == 2, err


def test_the_real_cli_process_exits_2_with_one_line(tmp_path):
    """``python -m nbguard.cli`` as a user runs it (one real process, the rest in-process above)."""
    done = subprocess.run([sys.executable, "-m", "nbguard.cli", "ls", str(tmp_path / "nonexistent")],
                          capture_output=True, text=True, cwd=ch.REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ch.REPO)})
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr, done.stderr
