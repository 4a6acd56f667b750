"""``@nbguard.checkpointed`` in a plain script: killed (SIGKILL), preempted (SIGTERM) or interrupted
(SIGINT) mid-epoch and run again, the script ends bitwise identical to a plain uninterrupted run, with
no resume code in it; exit statuses are those documented."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import copy, hashlib, random, sys, time
    import torch
    from torch import nn
    import nbguard

    torch.manual_seed(0); random.seed(0); torch.set_num_threads(1)
    X = torch.randn(120, 3, 6, 6); Y = (X[:, 0].mean((1, 2)) > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=10, shuffle=True)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2),
                          nn.Linear(4 * 4 * 4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    DECORATOR
    def train(epochs):
        history, best = [], None
        for epoch in range(epochs):
            model.train()
            total = 0.0
            for x, y in loader:
                loss = nn.functional.cross_entropy(model(x), y) + 0.001 * random.random()
                opt.zero_grad(); loss.backward(); opt.step()
                total += loss.item()
                time.sleep(0.04)
            history.append(total)
            if best is None or total < best[0]:
                best = (total, copy.deepcopy(model.state_dict()))
            print("epoch", epoch, flush=True)
        return history, best[0]

    history, best = train(6)
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode()); h.update(v.numpy().tobytes())
    for s in opt.state_dict()["state"].values():
        h.update(s["momentum_buffer"].numpy().tobytes())
    h.update(repr((history, best)).encode())
    print("DIGEST", h.hexdigest(), flush=True)
""")

pytestmark = pytest.mark.e2e


def write(tmp_path: Path, guarded: bool) -> Path:
    decorator = '@nbguard.checkpointed(every="1s")' if guarded else ""
    path = tmp_path / ("guarded.py" if guarded else "plain.py")
    path.write_text(SCRIPT.replace("DECORATOR", decorator))
    return path


def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "NBGUARD_DIR": str(tmp_path / "snaps"), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def digest(output: str) -> str:
    found = re.search(r"DIGEST (\w+)", output)
    assert found, output
    return found.group(1)


def run_until(script: Path, tmp_path: Path, marker: str, then: int, delay: float) -> tuple[int, str]:
    """Start the script, wait for ``marker`` in its output, wait ``delay``, send ``then``."""
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env(tmp_path), cwd=tmp_path)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            break
    time.sleep(delay)
    proc.send_signal(then)
    rest, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(lines) + rest


@pytest.fixture(scope="module")
def expected(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("plain")
    out = subprocess.run([sys.executable, str(write(tmp, False))], capture_output=True, text=True, env=env(tmp),
                         cwd=tmp, timeout=300)
    assert out.returncode == 0, out.stderr
    return digest(out.stdout)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, -signal.SIGTERM),
                                             (signal.SIGINT, 130)], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_stopped_script_resumes_mid_epoch_bitwise(tmp_path, expected, sig, status):
    script = write(tmp_path, True)
    code, out = run_until(script, tmp_path, "epoch 1", sig, 0.5)
    assert code == status, out
    if sig == signal.SIGTERM:
        assert "saved a snapshot before shutting down (SIGTERM); run it again" in out, out
    if sig == signal.SIGINT:
        assert "run the script again to continue" in out, out

    again = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env(tmp_path),
                           cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from snapshot" in again.stdout + again.stderr, again.stdout + again.stderr
    assert digest(again.stdout) == expected


def test_a_finished_run_is_not_trained_again_and_returns_its_result(tmp_path, expected):
    script = write(tmp_path, True)
    first = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env(tmp_path),
                           cwd=tmp_path, timeout=300)
    assert first.returncode == 0 and digest(first.stdout) == expected, first.stderr
    again = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env(tmp_path),
                           cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "epoch 0" not in again.stdout  # not trained again
    assert "already finished" in again.stdout + again.stderr
    assert digest(again.stdout) == expected  # the model, optimizer and the returned values came back


def test_a_finished_run_whose_training_function_was_edited_goes_on_from_its_final_state(tmp_path):
    script = write(tmp_path, True)
    first = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env(tmp_path),
                           cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr
    script.write_text(script.read_text().replace("for epoch in range(epochs):", "for epoch in range(epochs + 1):"))
    again = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env(tmp_path),
                           cwd=tmp_path, timeout=300)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    assert "train() changed since this snapshot" in out and "already finished" not in out, out
    assert "epoch 6" in again.stdout and "epoch 0" not in again.stdout, out  # only the added epoch trained
    assert digest(again.stdout) != digest(first.stdout)
