"""Loops inside the notebook's functions are safe points: the tutorial shapes (train_loop() called
per epoch, a cell that is one train_model() call, fit() -> train_one_epoch()), crashed inside the
function's batch loop and re-run, end exactly where an uninterrupted run ends. Real IPython shell."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
import torch

import nbguard

IPython = pytest.importorskip("IPython")

DATA = textwrap.dedent("""
    import copy, random, time, numpy as np, torch
    from torch import nn
    torch.manual_seed(0); random.seed(0); np.random.seed(0); torch.set_num_threads(1)
    X = torch.randn(96, 3, 6, 6); Y = (X[:, 0].mean((1, 2)) > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=12, shuffle=True)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2),
                          nn.Linear(4 * 4 * 4, 2))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    save_at = crash_at = None
    def checkpoint_hook(where):
        # Stands in for the timer: asks the guarded run for a safe point, or crashes, at a given batch.
        if where == save_at and "__nbguard__" in globals():
            __nbguard__.request_safe_point("test")
        if where == crash_at:
            raise RuntimeError("simulated crash")
""")

QUICKSTART_DEFS = textwrap.dedent("""
    losses = []
    def train_loop(dataloader, model, loss_fn, optimizer, epoch):
        model.train()
        running = 0.0
        for batch, (x, y) in enumerate(dataloader):
            loss = loss_fn(model(x), y) + 0.001 * random.random()
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            running += loss.item()
            checkpoint_hook((epoch, batch))
        losses.append(running)

    def test_loop(dataloader, model, loss_fn):
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in dataloader:
                correct += (model(x).argmax(1) == y).sum().item()
        return correct
""")
QUICKSTART_CELL = textwrap.dedent("""
    accs = []
    for t in range(4):
        train_loop(loader, model, loss_fn, optimizer, t)
        accs.append(test_loop(loader, model, loss_fn))
""")

TRANSFER_DEFS = textwrap.dedent("""
    def train_model(model, criterion, optimizer, scheduler, num_epochs=4):
        since = time.time()
        best_model_wts = copy.deepcopy(model.state_dict())
        best_acc = 0.0
        for epoch in range(num_epochs):
            for phase in ["train", "val"]:
                model.train() if phase == "train" else model.eval()
                running_corrects = 0
                for i, (inputs, labels) in enumerate(loader):
                    with torch.set_grad_enabled(phase == "train"):
                        outputs = model(inputs)
                        loss = criterion(outputs, labels)
                        if phase == "train":
                            optimizer.zero_grad(); loss.backward(); optimizer.step()
                    running_corrects += (outputs.argmax(1) == labels).sum().item()
                    checkpoint_hook((epoch, phase, i))
                if phase == "train":
                    scheduler.step()
                epoch_acc = running_corrects / len(X)
                if phase == "val" and epoch_acc > best_acc:
                    best_acc = epoch_acc
                    best_model_wts = copy.deepcopy(model.state_dict())
        model.load_state_dict(best_model_wts)
        return model, best_acc, since
""")
TRANSFER_CELL = "model_ft, best, started = train_model(model, loss_fn, optimizer, scheduler, num_epochs=4)\n"

CHAIN_DEFS = textwrap.dedent("""
    history = []
    def train_one_epoch(epoch):
        model.train()
        total = 0.0
        for i, (x, y) in enumerate(loader):
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            total += loss.item()
            checkpoint_hook((epoch, i))
        return total

    def fit(epochs):
        log = []
        for epoch in range(epochs):
            log.append(train_one_epoch(epoch))
            scheduler.step()
        return log
""")
CHAIN_CELL = "history = fit(4)\n"

SHAPES = {
    "quickstart": (QUICKSTART_DEFS, QUICKSTART_CELL, ("losses", "accs"), (2, 3)),
    "transfer": (TRANSFER_DEFS, TRANSFER_CELL, ("best",), (1, "val", 2)),
    "chain": (CHAIN_DEFS, CHAIN_CELL, ("history",), (2, 3)),
}


def plain(defs: str, cell: str, names: tuple[str, ...]) -> dict:
    ns: dict = {}
    exec(DATA, ns)
    exec(defs, ns)
    exec(cell, ns)
    return result_of(ns, names)


def result_of(ns: dict, names: tuple[str, ...]) -> dict:
    return {"model": {k: v.clone() for k, v in ns["model"].state_dict().items()},
            "opt": repr(ns["optimizer"].state_dict()["param_groups"]),
            "momentum": [s["momentum_buffer"].clone() for s in ns["optimizer"].state_dict()["state"].values()],
            **{n: ns[n] for n in names}}


def assert_same(got: dict, expected: dict) -> None:
    for key, value in expected["model"].items():
        assert torch.equal(got["model"][key], value), key
    assert all(torch.equal(a, b) for a, b in zip(got["momentum"], expected["momentum"], strict=True))
    for key in expected:
        if key not in ("model", "momentum"):
            assert got[key] == expected[key], key


def run(sh, source: str):
    return sh.run_cell(source)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_crash_inside_the_functions_batch_loop_resumes_there_exactly(shell, shape, capsys):
    defs, cell, names, where = SHAPES[shape]
    expected = plain(defs, cell, names)
    run(shell, DATA)
    run(shell, defs)
    shell.user_ns["save_at"] = where
    shell.user_ns["crash_at"] = (*where[:-1], where[-1] + 2)
    result = run(shell, "%%checkpointed --every 1h\n" + cell)
    assert not result.success  # crashed after the safe point, inside the same epoch
    catalog = nbguard.Catalog(os.environ["NBGUARD_DIR"])
    snaps = catalog.snapshots()
    assert snaps and len(snaps[0].position) >= 2, snaps[0].position  # inside the function's inner loop
    saved = catalog.get(snaps[0].id).restore({}, only=[n for n in catalog.get(snaps[0].id).names if ":" in n], rng=False)

    # A fresh kernel: the notebook is run again from the top.
    shell.user_ns.clear()
    run(shell, DATA)
    run(shell, defs)
    capsys.readouterr()
    result = run(shell, "%%checkpointed --every 1h\n" + cell)
    assert result.success
    out = capsys.readouterr().out
    assert "resumed from snapshot" in out and "changed since" not in out, out  # the same code, defined again
    assert_same(result_of(shell.user_ns, names), expected)
    if shape == "transfer":  # `since = time.time()` came back from the snapshot, not from the re-run
        assert shell.user_ns["started"] == saved.values["train_model:since"]


def test_the_functions_local_variables_are_in_the_snapshot(shell):
    run(shell, DATA)
    run(shell, TRANSFER_DEFS)
    shell.user_ns["save_at"] = (1, "train", 4)
    shell.user_ns["crash_at"] = (1, "train", 5)
    run(shell, "%%checkpointed --every 1h\n" + TRANSFER_CELL)
    snapshot = nbguard.Catalog(os.environ["NBGUARD_DIR"]).get("latest")
    assert {"train_model:best_acc", "train_model:best_model_wts", "train_model:since",
            "train_model:running_corrects"} <= set(snapshot.names)
    assert "train_model:phase" not in snapshot.names  # a loop variable: the resumed loop sets it
    assert "train_model:inputs" not in snapshot.names  # a batch is loaded again anyway
    assert "train_model:model" not in snapshot.names  # the notebook's model, saved once under its own name


def test_a_finished_one_call_run_restores_its_final_state_without_running_again(shell, capsys):
    expected = plain(TRANSFER_DEFS, TRANSFER_CELL, ("best",))
    run(shell, DATA)
    run(shell, TRANSFER_DEFS)
    assert run(shell, "%%checkpointed\n" + TRANSFER_CELL).success
    shell.user_ns.clear()
    run(shell, DATA)
    run(shell, TRANSFER_DEFS)
    shell.user_ns["crash_at"] = (0, "train", 0)  # would crash if trained again
    capsys.readouterr()
    result = run(shell, "%%checkpointed\n" + TRANSFER_CELL)
    assert result.success
    assert "already finished" in capsys.readouterr().out
    assert_same(result_of(shell.user_ns, ("best",)), expected)


def test_the_functions_are_themselves_again_after_the_run(shell):
    run(shell, DATA)
    run(shell, CHAIN_DEFS)
    codes = {name: shell.user_ns[name].__code__ for name in ("fit", "train_one_epoch")}
    run(shell, "%%checkpointed\n" + CHAIN_CELL)
    assert {name: shell.user_ns[name].__code__ for name in codes} == codes


def test_a_loop_in_installed_code_is_announced(shell, tmp_path, capsys, monkeypatch):
    package = tmp_path / "site" / "fake_trainer"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent("""
        def fit(model, optimizer, loader, epochs):
            for _ in range(epochs):
                for x, y in loader:
                    loss = model(x).logsumexp(1).mean()
                    optimizer.zero_grad(); loss.backward(); optimizer.step()
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    run(shell, DATA)
    run(shell, "import fake_trainer")
    codes = shell.user_ns["fake_trainer"].fit.__code__
    capsys.readouterr()
    result = run(shell, "%%checkpointed\nfake_trainer.fit(model, optimizer, loader, 2)\n")
    assert result.success
    out = capsys.readouterr().out
    assert "no training loop nbguard can reach: fake_trainer.fit()" in out, out
    assert "not during the loop" in out
    assert shell.user_ns["fake_trainer"].fit.__code__ is codes  # installed code is never rewritten
    assert "fake_trainer" in sys.modules
    snaps = nbguard.Catalog(os.environ["NBGUARD_DIR"]).snapshots()
    assert snaps and "final" in snaps[0].tags
    # %load_ext never promises a resume the cell will not perform
    from nbguard.training.session import current

    assert "restores its final state without training again" in current().banner()


CLASS_DEFS = textwrap.dedent("""
    class Trainer:
        def __init__(self, model, optimizer):
            self.model, self.optimizer = model, optimizer
            self.history = []
            self.best = None
        def fit(self, epochs):
            for epoch in range(epochs):
                total = 0.0
                for i, (x, y) in enumerate(loader):
                    loss = loss_fn(self.model(x), y)
                    self.optimizer.zero_grad(); loss.backward(); self.optimizer.step()
                    total += loss.item()
                    checkpoint_hook((epoch, i))
                self.history.append(total)
                self.best = total if self.best is None else min(self.best, total)
            return self.history
    trainer = Trainer(model, optimizer)
""")


def test_a_method_of_a_notebook_class_resumes_with_its_attributes(shell, capsys):
    """trainer.fit(): the loops of a method are safe points, and self's plain attributes
    (self.history, self.best) are saved and come back."""
    ns: dict = {}
    exec(DATA, ns)
    exec(CLASS_DEFS, ns)
    expected = ns["trainer"].fit(4), ns["trainer"].best, [v.clone() for v in ns["model"].state_dict().values()]
    run(shell, DATA)
    run(shell, CLASS_DEFS)
    shell.user_ns["save_at"], shell.user_ns["crash_at"] = (2, 3), (2, 5)
    assert not run(shell, "%%checkpointed --every 1h\nhist = trainer.fit(4)\n").success
    shell.user_ns.clear()
    run(shell, DATA)
    run(shell, CLASS_DEFS)
    capsys.readouterr()
    assert run(shell, "%%checkpointed --every 1h\nhist = trainer.fit(4)\n").success
    assert "resumed from snapshot" in capsys.readouterr().out
    assert shell.user_ns["hist"] == expected[0] and shell.user_ns["trainer"].best == expected[1]
    assert all(torch.equal(a, b) for a, b in zip(shell.user_ns["model"].state_dict().values(), expected[2], strict=True))


# -- the functions' code is part of what a snapshot was taken by ---------------------------------------


def crashed_chain_run(shell) -> None:
    """CHAIN_CELL crashed in epoch 2, after a snapshot inside train_one_epoch()'s batch loop; then a
    fresh kernel with the data defined again (the functions not yet)."""
    run(shell, DATA)
    run(shell, CHAIN_DEFS)
    shell.user_ns["save_at"], shell.user_ns["crash_at"] = (2, 3), (2, 5)
    assert not run(shell, "%%checkpointed --every 1h\n" + CHAIN_CELL).success
    shell.user_ns.clear()
    run(shell, DATA)


def test_a_run_resumed_after_its_function_was_edited_says_which(shell, capsys):
    crashed_chain_run(shell)
    run(shell, CHAIN_DEFS.replace("total = 0.0", "total = 0.0\n    model.zero_grad()"))  # loops nest the same
    capsys.readouterr()
    assert run(shell, "%%checkpointed --every 1h\n" + CHAIN_CELL).success
    out = capsys.readouterr().out
    assert "resumed from snapshot" in out and "train_one_epoch() changed since this snapshot" in out, out
    assert "fit() changed" not in out, out


def test_a_function_whose_loops_now_nest_differently_is_refused(shell):
    from IPython.core.error import UsageError

    crashed_chain_run(shell)
    renested = CHAIN_DEFS.replace("    for i, (x, y) in enumerate(loader):",
                                  "    for _ in range(1):\n     for i, (x, y) in enumerate(loader):")
    assert renested != CHAIN_DEFS
    run(shell, renested)
    result = run(shell, "%%checkpointed --every 1h\n" + CHAIN_CELL)
    assert not result.success and isinstance(result.error_in_exec, UsageError), result.error_in_exec
    text = str(result.error_in_exec)
    assert "earlier version of train_one_epoch() whose loops nest differently" in text, text
    assert "--resume-from" in text and "--fresh" in text, text
    assert shell.user_ns["history"] == []  # nothing ran, nothing was restored


def test_a_finished_run_whose_function_was_edited_goes_on_from_its_final_state_like_an_edited_cell(shell, capsys):
    run(shell, DATA)
    run(shell, TRANSFER_DEFS)
    assert run(shell, "%%checkpointed\n" + TRANSFER_CELL).success
    shell.user_ns.clear()
    run(shell, DATA)
    run(shell, "seen = []\ndef checkpoint_hook(where):\n    seen.append(where)\n")
    run(shell, TRANSFER_DEFS.replace("for epoch in range(num_epochs):", "for epoch in range(num_epochs + 1):"))
    capsys.readouterr()
    assert run(shell, "%%checkpointed\n" + TRANSFER_CELL).success
    out = capsys.readouterr().out
    # both were edited here: the function, and the hook it calls (redefined to count the batches run)
    assert "train_model() and checkpoint_hook() changed since this snapshot (their loops are the same)" in out, out
    assert "already finished" not in out, out
    seen = shell.user_ns["seen"]
    assert seen and {where[0] for where in seen} == {4}, seen  # the added epoch ran, the first four did not again


def test_what_a_snapshot_says_of_functions_is_compared_only_where_both_know_it():
    from nbguard.training.resume_choice import CodeVersion

    code = CodeVersion("cell", "nest", {"fit": ("f1", "s1"), "helper": ("h1", "")})
    assert code.edited_since({"fingerprint": "cell", "structure": "nest"}) == []  # taken before functions were recorded
    assert code.edited_since({"fingerprint": "cell", "functions": {"other": ["o", ""]}}) == []  # none in common
    saved = {"fingerprint": "old", "structure": "nest", "functions": {"fit": ["f0", "s1"], "helper": ["h1", ""]}}
    assert code.edited_since(saved) == ["the cell", "fit()"]
    assert code.renested_since(saved) == []
    assert code.renested_since({**saved, "functions": {"fit": ["f0", "s0"]}}) == ["fit()"]
    assert code.record()["functions"] == {"fit": ["f1", "s1"], "helper": ["h1", ""]}
