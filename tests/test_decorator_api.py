"""``nbguard.checkpointed`` used in process, the ways a script may apply it."""

from __future__ import annotations

import textwrap

import pytest
import torch

import nbguard
from nbguard.engine.catalog import Catalog
from nbguard.stores.local import LocalStore
from nbguard.training.resume_choice import CodeVersion, choose
from nbguard.training.spelling import DECORATOR, MAGIC

MODULE = textwrap.dedent("""
    import torch
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)

    def train(steps):
        for step in range(steps):
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss)
""")


def _module() -> dict:
    namespace: dict = {"__name__": "script"}
    exec(compile(MODULE, "<script>", "exec"), namespace)
    return namespace


def test_applied_by_a_call_under_another_name_it_still_saves_the_training_objects(tmp_path):
    ns = _module()
    guarded = nbguard.checkpointed(every="1h", dir=str(tmp_path), name="bycall")(ns["train"])
    guarded(3)
    snapshot = nbguard.load(str(tmp_path), "latest", run="bycall")
    assert {"model", "opt"} <= set(snapshot.names)


def test_as_a_decorator_it_saves_the_training_objects(tmp_path):
    ns = _module()
    ns["train"] = nbguard.checkpointed(every="1h", dir=str(tmp_path), name="decorated")(ns["train"])
    ns["train"](3)
    snapshot = nbguard.load(str(tmp_path), "latest", run="decorated")
    assert {"model", "opt"} <= set(snapshot.names)


def test_a_finished_run_says_how_to_train_again_the_way_a_script_writes_it(tmp_path, capsys):
    ns = _module()
    ns["train"] = nbguard.checkpointed(every="1h", dir=str(tmp_path), name="twice")(ns["train"])
    ns["train"](3)
    capsys.readouterr()
    ns["train"](3)
    out = capsys.readouterr().out
    assert "already finished" in out and "fresh=True" in out, out
    assert "%%checkpointed" not in out, out


@pytest.mark.parametrize("spelling, said, not_said", [
    (MAGIC, ("%%checkpointed --resume-from", "--fresh"), ("fresh=True",)),
    (DECORATOR, ("resume_from='", "fresh=True"), ("%%checkpointed", "--fresh")),
])
def test_a_snapshot_whose_loops_nest_differently_is_refused_in_the_entry_points_words(tmp_path, spelling, said,
                                                                                       not_said):
    store = LocalStore(tmp_path / "store")
    saved = nbguard.Guard(store, run="r", report=None).save(
        {"model": torch.nn.Linear(2, 2)}, extra={"fingerprint": "f", "structure": "s"}, wait=True).result()
    with pytest.raises(nbguard.UsageError) as raised:
        choose(Catalog(store), "r", code=CodeVersion("g", "other"), spelling=spelling)
    message = str(raised.value)
    assert "loops nest differently" in message and saved.id in message, message
    assert all(words in message for words in said) and not any(words in message for words in not_said), message
