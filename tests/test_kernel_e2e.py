"""The guarantee, end to end: a real kernel SIGKILLed at a random moment of a %%checkpointed cell,
started again and re-run, ends bitwise identical to an uninterrupted run of the cell without nbguard."""

from __future__ import annotations

import random
import re
import textwrap
import time

import pytest

from tests.kernel_harness import Kernel

pytestmark = pytest.mark.e2e

SETUP = textwrap.dedent("""
    import random, time, numpy as np, torch
    from torch import nn
    from tqdm.auto import tqdm, trange
    torch.manual_seed(0); random.seed(0); np.random.seed(0); torch.set_num_threads(1)
    X = torch.randn(128, 8); Y = (X[:, 0] + X[:, 1] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=16, shuffle=True,
                                         num_workers=WORKERS, persistent_workers=False)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    history, total = [], 0.0
    def train_step(x, y):
        loss = nn.functional.cross_entropy(model(x), y) + 0.001 * random.random()
        opt.zero_grad(); loss.backward(); opt.step()
        time.sleep(0.03)
        return loss.item()
""")

LOOPS = {
    "nested-enumerate": """
        for epoch in range(5):
            running = 0.0
            for i, (x, y) in enumerate(loader):
                running += train_step(x, y)
                total += 1
            sched.step()
            history.append(running)
            print("epoch", epoch, flush=True)
    """,
    "tqdm-break-continue": """
        for epoch in trange(5):
            running = 0.0
            for i, (x, y) in enumerate(tqdm(loader, leave=False)):
                if i == 2:
                    continue
                if i == 6:
                    break
                running += train_step(x, y)
                total += float(np.random.rand())
            sched.step()
            history.append(running)
            print("epoch", epoch, flush=True)
    """,
    "while-steps": """
        step, max_steps = 0, 36
        while step < max_steps:
            for x, y in loader:
                history.append(train_step(x, y))
                step += 1
                if step % 8 == 0:
                    sched.step(); print("epoch", step // 8, flush=True)
                if step >= max_steps:
                    break
    """,
}

DIGEST = textwrap.dedent("""
    import hashlib
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode()); h.update(v.numpy().tobytes())
    for s in opt.state_dict()["state"].values():
        for k, v in sorted(s.items()):
            h.update(v.numpy().tobytes())
    h.update(repr(sched.state_dict()).encode()); h.update(repr(history).encode()); h.update(repr(total).encode())
    print("DIGEST", h.hexdigest())
""")


def _digest(output: str) -> str:
    match = re.search(r"DIGEST (\w+)", output)
    assert match, output
    return match.group(1)


@pytest.mark.parametrize(("form", "workers"), [(form, 0) for form in sorted(LOOPS)] + [("nested-enumerate", 2)])
def test_killed_kernel_resumes_bitwise(tmp_path, form, workers):
    setup = SETUP.replace("WORKERS", str(workers))
    loop = textwrap.dedent(LOOPS[form])
    kernel = Kernel(str(tmp_path), env={"NBGUARD_DIR": str(tmp_path / "snaps")})
    try:
        kernel.count_optimizer_steps()
        kernel.run(setup)
        kernel.run(loop)
        expected = _digest(kernel.run(DIGEST)[0])
        steps = kernel.optimizer_steps()

        kernel.restart()
        kernel.run("%load_ext nbguard")
        kernel.run(setup)
        # A random moment in the second half, when snapshots exist: mid-step, mid-save or at a boundary.
        rng = random.Random(f"{form}-{workers}")
        kernel.kill_during("%%checkpointed --every 0.3s\n" + loop, after_step=rng.randint(steps * 6 // 10, steps * 85 // 100),
                           delay=rng.uniform(0.0, 0.05))

        kernel.restart()
        out, error = kernel.run("%load_ext nbguard")
        assert error is None and "snapshot" in out
        kernel.run(setup)
        out, error = kernel.run("%%checkpointed --every 0.3s\n" + loop)
        assert error is None, out
        assert "resumed from snapshot" in out, out
        assert _digest(kernel.run(DIGEST)[0]) == expected
    finally:
        kernel.shutdown()


def test_interrupt_saves_then_stops_and_rerun_continues(tmp_path):
    setup = SETUP.replace("WORKERS", "0")
    loop = textwrap.dedent(LOOPS["nested-enumerate"])
    kernel = Kernel(str(tmp_path), env={"NBGUARD_DIR": str(tmp_path / "snaps")})
    try:
        kernel.run(setup)
        kernel.run(loop)
        expected = _digest(kernel.run(DIGEST)[0])
        kernel.restart()
        kernel.run("%load_ext nbguard")
        kernel.run(setup)
        kernel.run("%%checkpointed --every 1h\n" + loop, until=lambda out: "epoch 1" in out)
        kernel.km.interrupt_kernel()
        out, error = kernel.run("print('after')")
        # The interrupted cell's own output ended before 'after' ran.
        out, error = kernel.run("%%checkpointed --every 1h\n" + loop)
        assert "resumed from snapshot" in out, out
        assert _digest(kernel.run(DIGEST)[0]) == expected
    finally:
        kernel.shutdown()


def test_sigterm_saves_at_the_next_safe_point_then_exits(tmp_path):
    import os
    import signal

    setup = SETUP.replace("WORKERS", "0")
    loop = textwrap.dedent(LOOPS["nested-enumerate"])
    kernel = Kernel(str(tmp_path), env={"NBGUARD_DIR": str(tmp_path / "snaps")})
    try:
        kernel.run(setup)
        kernel.run(loop)
        expected = _digest(kernel.run(DIGEST)[0])
        kernel.restart()
        kernel.run("%load_ext nbguard")
        kernel.run(setup)
        kernel.run("%%checkpointed --every 1h\n" + loop, until=lambda out: "epoch 1" in out)
        os.kill(kernel.km.provisioner.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while kernel.km.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not kernel.km.is_alive()
        import nbguard

        newest = nbguard.Catalog(str(tmp_path / "snaps")).snapshots()[0]
        assert "interrupted" in newest.tags and newest.position.get("epoch", 0) >= 1
        kernel.restart()
        kernel.run("%load_ext nbguard")
        kernel.run(setup)
        out, error = kernel.run("%%checkpointed --every 1h\n" + loop)
        assert "resumed from snapshot" in out, out
        assert _digest(kernel.run(DIGEST)[0]) == expected
    finally:
        kernel.shutdown()


def test_shutdown_while_idle_saves_changes_made_outside_the_cell(tmp_path):
    setup = SETUP.replace("WORKERS", "0")
    loop = textwrap.dedent(LOOPS["nested-enumerate"])
    kernel = Kernel(str(tmp_path), env={"NBGUARD_DIR": str(tmp_path / "snaps")})
    try:
        kernel.run("%load_ext nbguard")
        kernel.run(setup)
        kernel.run("%%checkpointed --every 1h\n" + loop)
        kernel.run("for x, y in loader:\n    train_step(x, y)")  # more training, unguarded
        expected = _digest(kernel.run(DIGEST)[0])
        kernel.km.shutdown_kernel(now=False)  # a graceful shutdown or restart: atexit runs
        kernel.km = None
        import nbguard

        catalog = nbguard.Catalog(str(tmp_path / "snaps"))
        newest = catalog.snapshots()[0]
        assert "shutdown" in newest.tags
        kernel.start()
        kernel.run("%load_ext nbguard")
        kernel.run(setup)
        out, _ = kernel.run("%%checkpointed --every 1h\n" + loop)
        assert "already finished" in out, out
        assert _digest(kernel.run(DIGEST)[0]) == expected
    finally:
        kernel.shutdown()


def run_all(kernel: Kernel, cells: list[str], timeout: float = 180) -> list[tuple[str, str]]:
    """Queue every cell at once, as "Run all" does (stop_on_error): (reply status, output) per cell."""
    ids = [kernel.kc.execute(cell) for cell in cells]
    statuses: dict[str, str] = {}
    texts: dict[str, list[str]] = {i: [] for i in ids}
    deadline = time.monotonic() + timeout
    while len(statuses) < len(ids) and time.monotonic() < deadline:
        reply = kernel.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") in texts:  # earlier cells' replies are still queued
            statuses[reply["parent_header"]["msg_id"]] = reply["content"]["status"]
    while True:
        try:
            msg = kernel.kc.get_iopub_msg(timeout=1)
        except Exception:
            break
        parent = msg["parent_header"].get("msg_id")
        if parent in texts and msg["msg_type"] == "stream":
            texts[parent].append(msg["content"]["text"])
        elif parent in texts and msg["msg_type"] == "error":
            texts[parent].append("\n".join(msg["content"]["traceback"]))
    return [(statuses.get(i, "missing"), "".join(texts[i])) for i in ids]


def test_refusals_end_the_cell_in_error_and_run_all_stops(tmp_path):
    setup = SETUP.replace("WORKERS", "0")
    loop = textwrap.dedent(LOOPS["nested-enumerate"])
    after = "print('NEXT CELL RAN', history)"
    kernel = Kernel(str(tmp_path), env={"NBGUARD_DIR": str(tmp_path / "snaps")})
    try:
        kernel.run("%load_ext nbguard")
        kernel.run(setup)
        (status, out), (next_status, next_out) = run_all(kernel, ["%%checkpointed --evry 5m\n" + loop, after])
        assert status == "error" and "unrecognized arguments: --evry 5m" in out, out
        assert "Traceback" not in out and next_status == "aborted" and "NEXT CELL RAN" not in next_out

        kernel.run("%%checkpointed --every-iter 1\n" + loop.replace("history.append(running)", "history.append(running)\n    if epoch == 2: raise RuntimeError('crash')"))
        kernel.restart()
        kernel.run("%load_ext nbguard")
        kernel.run(setup.replace("nn.Linear(32, 2)", "nn.Linear(32, 3)"))
        cell = "%%checkpointed --every-iter 1\n" + loop.replace("history.append(running)", "history.append(running)\n    if epoch == 2: raise RuntimeError('crash')")
        (status, out), (next_status, next_out) = run_all(kernel, [cell, after])
        assert status == "error" and "--fresh" in out and "build the same model" in out, out
        assert "Traceback" not in out and next_status == "aborted" and "NEXT CELL RAN" not in next_out
    finally:
        kernel.shutdown()


def test_budget_stops_the_cell_cleanly_and_a_new_session_continues(tmp_path):
    setup = SETUP.replace("WORKERS", "0").replace("time.sleep(0.03)", "time.sleep(0.1)")  # 4 s of training
    loop = textwrap.dedent(LOOPS["nested-enumerate"])
    kernel = Kernel(str(tmp_path), env={"NBGUARD_DIR": str(tmp_path / "snaps")})
    try:
        kernel.run(setup)
        kernel.run(loop)
        expected = _digest(kernel.run(DIGEST)[0])
        kernel.restart()
        kernel.run("%load_ext nbguard")
        kernel.run(setup)
        (status, out), (next_status, _) = run_all(kernel, ["%%checkpointed --every 1h --budget 1.5s\n" + loop, DIGEST])
        assert status == "error" and next_status == "aborted", out
        assert "time budget of 1.5 s" in out and "continues from there" in out and "Traceback" not in out, out
        kernel.restart()
        kernel.run("%load_ext nbguard")
        kernel.run(setup)
        out, error = kernel.run("%%checkpointed --every 1h\n" + loop)
        assert error is None and "resumed from snapshot" in out, out
        assert _digest(kernel.run(DIGEST)[0]) == expected
    finally:
        kernel.shutdown()


def test_plain_kernels_name_their_folder_after_the_training_cell(tmp_path, monkeypatch):
    """Kernels started by jupyter_client/papermill/nbconvert do not say which notebook they run: two
    notebooks in one folder must not silently share nbguard-snapshots/notebook."""
    for name in ("NBGUARD_DIR", "JPY_SESSION_NAME"):
        monkeypatch.delenv(name, raising=False)
    setup = SETUP.replace("WORKERS", "0")
    folders = []
    for form in ("nested-enumerate", "while-steps"):
        kernel = Kernel(str(tmp_path))
        try:
            out, error = kernel.run("%load_ext nbguard")
            assert error is None and "does not say which notebook it runs" in out, out
            kernel.run(setup)
            out, error = kernel.run("%%checkpointed --every 1h\n" + textwrap.dedent(LOOPS[form]))
            assert error is None and "named after the loops of its training cell" in out and "NBGUARD_DIR" in out, out
            folders.append(re.search(r"snapshots go to (\S+), named", out).group(1))
        finally:
            kernel.shutdown()
    assert folders[0] != folders[1] and all(f.startswith(str(tmp_path / "nbguard-snapshots")) for f in folders)
    assert not (tmp_path / "nbguard-snapshots" / "notebook").exists()
    import nbguard

    assert all(nbguard.Catalog(f).snapshots() for f in folders)
