"""``nbguard.checkpointed`` used in process, the ways a script may apply it."""

from __future__ import annotations

import textwrap

import nbguard

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
