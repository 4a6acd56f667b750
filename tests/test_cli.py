"""The nbguard command: ls, show, verify (exit 1 on damage), export, gc, and the demo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import nbguard
from nbguard.cli import main


@pytest.fixture
def folder(tmp_path):
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    guard = nbguard.Guard(tmp_path / "snaps", run="cli", report=None)
    for epoch in range(2):
        guard.save({"model": model, "opt": opt}, metrics={"loss": 1.0 / (epoch + 1)},
                   position={"epoch": epoch + 1}, wait=True)
    return tmp_path / "snaps"


def test_ls_show_export_gc(folder, tmp_path, capsys):
    assert main(["ls", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "2 snapshots" in out and "epoch 2" in out and "loss=0.5" in out
    assert main(["show", "latest", "--dir", str(folder)]) == 0
    assert "holds      model: Linear" in capsys.readouterr().out
    target = tmp_path / "model.safetensors"
    assert main(["export", "best:loss", "--module", "model", "--out", str(target), "--dir", str(folder)]) == 0
    assert set(nbguard.load_weights(target)) == {"weight", "bias"}
    assert main(["gc", str(folder)]) == 0
    assert "freed" in capsys.readouterr().out


def test_verify_exits_1_and_names_the_damaged_snapshot(folder, capsys):
    assert main(["verify", str(folder)]) == 0
    blob = next((folder / "blobs").rglob("*.safetensors"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert main(["verify", str(folder)]) == 1
    assert "DAMAGED" in capsys.readouterr().out


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["ls", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_help_shows_plain_text(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "The nbguard command" in out and "NBGUARD_DIR" in out


def test_a_reader_that_goes_away_is_no_error(folder):
    """`nbguard ls DIR | head -1`: head exits early; no BrokenPipeError, exit status 0."""
    proc = subprocess.Popen([sys.executable, "-m", "nbguard.cli", "ls", str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child writes anything: its first write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Error" not in err and "Traceback" not in err, err


@pytest.mark.e2e
def test_demo_crashes_resumes_and_matches(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "NBGUARD_DIR"}
    (tmp_path / "tmp").mkdir()
    (tmp_path / "cwd").mkdir()
    result = subprocess.run([sys.executable, "-m", "nbguard.cli", "demo"], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path / "cwd", env={**env, "TMPDIR": str(tmp_path / "tmp")})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "killed (SIGKILL)" in result.stdout and "bit for bit" in result.stdout
    assert os.listdir(tmp_path / "cwd") == []  # nothing left in the folder it ran from (a repository)
    store = tmp_path / "tmp" / "nbguard-demo"
    # the compared weights were not written into the store (and no save left a lease behind)
    assert sorted(x for x in os.listdir(store) if x != "leases") == ["blobs", "runs"]
    assert not (store / "leases").exists() or not os.listdir(store / "leases")
    # (torch itself may leave its compiler cache folder there: building an Adam optimizer imports dynamo)
    assert [x for x in os.listdir(tmp_path / "tmp") if not x.startswith("torchinductor_")] == ["nbguard-demo"]
