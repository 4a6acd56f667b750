"""``nbguard demo``: train, crash for real, resume, and check the result — in under a minute.

Three child processes run the same small training job on generated data: one without
interruption (the reference), one with autosave that is killed with SIGKILL half-way through an
epoch (a real crash), and one that resumes from the newest snapshot. The demo then compares the
final weights of the resumed run with the reference, bit for bit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

EPOCHS = 8
CRASH_EPOCH = 5  # the child is killed half-way through this epoch (1-based)
BATCHES = 40


def _build():
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(1)  # bitwise-identical results across processes
    x = torch.randn(BATCHES * 32, 20)
    y = (x[:, :5].sum(dim=1) > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched, loader


def _train(mode: str, folder: str, out: str) -> None:
    import torch

    from .engine.guard import Guard
    from .engine.weights import write_safetensors

    model, opt, sched, loader = _build()
    history: list[float] = []
    start = 0
    guard = Guard(folder, run="demo", keep=3, report=None) if mode != "reference" else None
    state = {"model": model, "opt": opt, "sched": sched, "history": history}
    if mode == "resume" and guard is not None:
        report = guard.restore(state)
        history = report.values["history"]
        state["history"] = history
        start = report.position["epoch"]
        print(f"RESUMED {start} {report.snapshot.id}", flush=True)
    for epoch in range(start, EPOCHS):
        total = 0.0
        for batch, (xb, yb) in enumerate(loader):
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            if mode == "crash" and epoch + 1 == CRASH_EPOCH and batch == BATCHES // 2:
                print(f"CRASHING {epoch + 1} {batch}", flush=True)
                time.sleep(60)  # the parent kills us here
        sched.step()
        history.append(total / len(loader))
        if guard is not None:
            guard.save(state, metrics={"loss": history[-1]}, position={"epoch": epoch + 1}).wait()
            print(f"SAVED {epoch + 1}", flush=True)
    write_safetensors(model.state_dict(), out, {"mode": mode})
    print(f"DONE {history[-1]:.6f}", flush=True)


def _child(mode: str, folder: str, out: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nbguard.demo", mode, folder, out],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _lines(proc: subprocess.Popen):
    assert proc.stdout is not None
    for line in proc.stdout:
        yield line.split()


def main(folder: str | None = None) -> int:
    """Run the demo; returns 0 when the resumed run matches the uninterrupted one."""
    where = "(from NBGUARD_DIR)" if os.environ.get("NBGUARD_DIR") and not folder else "(set NBGUARD_DIR to choose another folder)"
    # Not the current folder: run from a checkout, the demo must not leave files in the repository.
    folder = os.path.abspath(folder or os.environ.get("NBGUARD_DIR") or os.path.join(tempfile.gettempdir(), "nbguard-demo"))
    shutil.rmtree(os.path.join(folder, "runs", "demo"), ignore_errors=True)
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nbguard-demo-weights-") as work:  # the compared weights: not the store's
        return _run(folder, where, work)


def _run(folder: str, where: str, work: str) -> int:
    import torch

    from .engine.catalog import Catalog
    from .engine.weights import load_weights
    from .humanize import size as human_size

    began = time.time()
    print("nbguard demo: what happens when training crashes half-way\n")
    print(f"Snapshots go to {folder} {where}.\n")

    print(f"1. Training a small network for {EPOCHS} epochs without interruption, as a reference...")
    reference = _child("reference", folder, os.path.join(work, "reference.safetensors"))
    reference_loss = next(float(w[1]) for w in _lines(reference) if w[0] == "DONE")
    reference.wait()
    print(f"   done: final training loss {reference_loss:.4f}\n")

    print("2. The same training with nbguard saving a snapshot after every epoch...")
    crash = _child("crash", folder, os.path.join(work, "crashed.safetensors"))
    for words in _lines(crash):
        if words[0] == "SAVED":
            print(f"   epoch {words[1]} finished, snapshot saved")
        if words[0] == "CRASHING":
            crash.send_signal(signal.SIGKILL)
            crash.wait()
            print(f"   CRASH: the training process was killed (SIGKILL) half-way through epoch {words[1]},\n"
                  "   like a notebook whose runtime disconnects. Everything in its memory is gone.\n")
            break
    catalog = Catalog(folder)
    snapshots = catalog.snapshots("demo")
    newest = catalog.get("latest", "demo")
    print(f"   On disk: {len(snapshots)} snapshots kept (older ones are cleaned up automatically);")
    print(f"   the newest was taken after epoch {newest.position['epoch']} and holds {human_size(newest.info.size)}:")
    print("   the model's weights, the optimizer's (Adam) moving averages, the learning-rate schedule,")
    print("   the loss history and the state of every random number generator.\n")

    print("3. Starting again, as you would after reconnecting: nbguard restores the newest snapshot...")
    resumed = _child("resume", folder, os.path.join(work, "resumed.safetensors"))
    resumed_loss = None
    for words in _lines(resumed):
        if words[0] == "RESUMED":
            print(f"   restored snapshot {words[2]}: weights, optimizer, scheduler, history and random generators;")
            print(f"   training continues with epoch {int(words[1]) + 1} of {EPOCHS}")
        if words[0] == "DONE":
            resumed_loss = float(words[1])
    resumed.wait()
    print(f"   done: final training loss {resumed_loss:.4f}\n")

    ref = load_weights(os.path.join(work, "reference.safetensors"))
    res = load_weights(os.path.join(work, "resumed.safetensors"))
    same = ref.keys() == res.keys() and all(torch.equal(ref[k], res[k]) for k in ref)
    if same:
        print("Result: the resumed run ended with exactly the same weights as the uninterrupted run,")
        print(f"bit for bit (checked all {len(ref)} weight tensors). Nothing was lost but half an epoch.")
    else:
        print("Result: MISMATCH — the resumed run differs from the uninterrupted one. Please report this.")
    print(f"\n(demo took {time.time() - began:.0f} s; look at the snapshots with: nbguard ls {folder})")
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) == 4:
        _train(*sys.argv[1:])
    else:
        sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
