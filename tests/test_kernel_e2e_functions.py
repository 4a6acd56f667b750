"""The tutorial shapes, end to end in a real kernel: the training loop lives in functions defined in
earlier cells; the kernel is SIGKILLed mid-epoch, started again and the notebook re-run; the run
resumes inside the function's batch loop and ends bitwise identical to a plain uninterrupted run."""

from __future__ import annotations

import random
import re
import textwrap

import pytest

from tests.kernel_harness import Kernel

pytestmark = pytest.mark.e2e

DATA = textwrap.dedent("""
    import copy, random, time, numpy as np, torch
    from torch import nn
    torch.manual_seed(0); random.seed(0); np.random.seed(0); torch.set_num_threads(1)
    X = torch.randn(120, 3, 6, 6); Y = (X[:, 0].mean((1, 2)) > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=10, shuffle=True)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2),
                          nn.Linear(4 * 4 * 4, 2))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
""")

SHAPES = {
    # The PyTorch quickstart: train_loop/test_loop in an earlier cell, printing every few batches.
    "quickstart": (textwrap.dedent("""
        def train_loop(dataloader, model, loss_fn, optimizer):
            size = len(dataloader.dataset)
            model.train()
            for batch, (X, y) in enumerate(dataloader):
                pred = model(X)
                loss = loss_fn(pred, y) + 0.001 * random.random()
                loss.backward(); optimizer.step(); optimizer.zero_grad()
                time.sleep(0.05)
                if batch % 4 == 0:
                    print(f"loss: {loss.item():>7f}  [{(batch + 1) * len(X):>5d}/{size:>5d}]", flush=True)

        def test_loop(dataloader, model, loss_fn):
            model.eval()
            correct = 0
            with torch.no_grad():
                for X, y in dataloader:
                    correct += (model(X).argmax(1) == y).type(torch.float).sum().item()
            return correct / len(dataloader.dataset)
        accs = []
    """), textwrap.dedent("""
        epochs = 5
        for t in range(epochs):
            print(f"Epoch {t+1}", flush=True)
            train_loop(loader, model, loss_fn, optimizer)
            accs.append(test_loop(loader, model, loss_fn))
        print("Done!")
    """), "accs", 2),
    # The transfer-learning tutorial: the cell is one call; best weights by deepcopy; since = time.time().
    "transfer": (textwrap.dedent("""
        def train_model(model, criterion, optimizer, scheduler, num_epochs=5):
            since = time.time()
            best_model_wts = copy.deepcopy(model.state_dict())
            best_acc = 0.0
            for epoch in range(num_epochs):
                print(f"Epoch {epoch + 1}", flush=True)
                for phase in ["train", "val"]:
                    model.train() if phase == "train" else model.eval()
                    running_corrects = 0
                    for inputs, labels in loader:
                        optimizer.zero_grad()
                        with torch.set_grad_enabled(phase == "train"):
                            outputs = model(inputs)
                            loss = criterion(outputs, labels)
                            if phase == "train":
                                loss.backward(); optimizer.step()
                        running_corrects += (outputs.argmax(1) == labels).sum().item()
                        time.sleep(0.03)
                    if phase == "train":
                        scheduler.step()
                    epoch_acc = running_corrects / len(X)
                    if phase == "val" and epoch_acc > best_acc:
                        best_acc = epoch_acc
                        best_model_wts = copy.deepcopy(model.state_dict())
            print(f"Training complete; best val Acc: {best_acc:4f}", flush=True)
            model.load_state_dict(best_model_wts)
            return model, best_acc, since
    """), "model_ft, best_acc, since = train_model(model, loss_fn, optimizer, scheduler, num_epochs=5)\n",
        "best_acc", 3),
    # Two levels: fit() -> train_one_epoch() -> the batch loop.
    "chain": (textwrap.dedent("""
        def train_one_epoch(epoch):
            model.train()
            total = 0.0
            for x, y in loader:
                loss = loss_fn(model(x), y)
                optimizer.zero_grad(); loss.backward(); optimizer.step()
                total += loss.item()
                time.sleep(0.05)
            return total

        def fit(epochs):
            log = []
            for epoch in range(epochs):
                print(f"Epoch {epoch + 1}", flush=True)
                log.append(train_one_epoch(epoch))
                scheduler.step()
            return log
    """), "history = fit(5)\n", "history", 2),
}

DIGEST = textwrap.dedent("""
    import hashlib
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode()); h.update(v.numpy().tobytes())
    for s in optimizer.state_dict()["state"].values():
        h.update(s["momentum_buffer"].numpy().tobytes())
    h.update(repr(RESULT).encode())
    print("DIGEST", h.hexdigest())
""")


def _digest(output: str) -> str:
    match = re.search(r"DIGEST (\w+)", output)
    assert match, output
    return match.group(1)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_killed_mid_epoch_resumes_inside_the_functions_batch_loop(tmp_path, shape):
    defs, cell, result, depth = SHAPES[shape]
    digest = DIGEST.replace("RESULT", result)
    kernel = Kernel(str(tmp_path), env={"NBGUARD_DIR": str(tmp_path / "snaps"), "OMP_NUM_THREADS": "1"})
    try:
        kernel.count_optimizer_steps()
        kernel.run(DATA)
        kernel.run(defs)
        kernel.run(cell)
        expected = _digest(kernel.run(digest)[0])
        steps = kernel.optimizer_steps()

        kernel.restart()
        kernel.run("%load_ext nbguard")
        kernel.run(DATA)
        kernel.run(defs)
        rng = random.Random(shape)
        kernel.kill_during("%%checkpointed --every 1s\n" + cell, after_step=rng.randint(steps // 2, steps * 8 // 10),
                           delay=rng.uniform(0.0, 0.04))

        kernel.restart()
        kernel.run("%load_ext nbguard")
        kernel.run(DATA)
        kernel.run(defs)
        out, error = kernel.run("%%checkpointed --every 1s\n" + cell)
        assert error is None, out
        resumed = re.search(r"resumed from snapshot \S+ \(([^)]*)\)", out)
        assert resumed, out
        # Inside the function's innermost loop: every loop of the path is in the position.
        position = resumed.group(1).split(", ")[1:]
        assert len(position) >= min(depth, 2), out
        assert _digest(kernel.run(digest)[0]) == expected
    finally:
        kernel.shutdown()
