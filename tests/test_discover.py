"""discover: state is found, not declared. Real torch objects in a plain dict namespace; functions
"from another cell" are exec'd into the same namespace, as IPython does."""

from __future__ import annotations

import ast
import functools
import logging
import math
import textwrap
from unittest import mock

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from nbguard.errors import UsageError
from nbguard.training.discover import Discovery, classify, discover, training_objects, why_not_plain

SETUP = """
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

torch.manual_seed(0)
X_train = torch.randn(64, 4)
y_train = torch.randint(0, 2, (64,))
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
scaler = torch.amp.GradScaler("cpu")
loader = DataLoader(TensorDataset(X_train, y_train), batch_size=16, shuffle=True)
history = []
best_acc = 0.0
"""


def notebook(*cells: str) -> dict:
    """A namespace after running these cells, the way a kernel's user namespace looks."""
    ns: dict = {"__name__": "__main__"}
    for cell in cells:
        exec(compile(textwrap.dedent(cell), "<cell>", "exec"), ns)
    return ns


def run(cell: str, ns: dict) -> None:
    exec(compile(textwrap.dedent(cell), "<cell>", "exec"), ns)


def test_training_cell_with_nested_loops_enumerate_and_tqdm():
    ns = notebook(SETUP)
    cell = textwrap.dedent("""
        for epoch in range(3):
            model.train()
            total = 0.0
            for i, (x, y) in enumerate(tqdm(loader, leave=False)):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                total += loss.item()
            sched.step()
            history.append(total)
            best_acc = max(best_acc, 1 / (1 + total))
    """)
    found = discover(cell, ns)
    assert list(found.objects) == ["model", "opt", "scaler", "sched"]
    assert found.objects["opt"] is ns["opt"]
    assert found.values == ["epoch", "total", "i", "x", "y", "loss", "history", "best_acc"]
    assert "X_train" not in found.values and "X_train" not in found.skipped  # only read
    assert found.skipped == {}
    run(cell, ns)  # after the run every value exists and is plain
    again = discover(cell, ns)
    assert again.values == found.values and list(again.objects) == list(found.objects)


def test_state_touched_by_functions_from_another_cell():
    ns = notebook(SETUP, """
        metrics = {"steps": 0}
        class EMA:
            def __init__(self, m): self.shadow = {k: v.clone() for k, v in m.state_dict().items()}
            def state_dict(self): return dict(self.shadow)
            def load_state_dict(self, d): self.shadow = dict(d)
        ema = EMA(model)
        val_loader = DataLoader(TensorDataset(X_train, y_train), batch_size=32,
                                generator=torch.Generator().manual_seed(1), shuffle=True)

        def evaluate():
            correct = 0
            for x, y in val_loader:
                correct += (model(x).argmax(1) == y).sum().item()
            return correct / len(val_loader.dataset)

        def train_one_epoch():
            global best_acc, last_loss
            model.train()
            for x, y in loader:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                metrics["steps"] += 1
                history.append(loss.item())
            last_loss = history[-1]
            best_acc = max(best_acc, evaluate())
    """)
    cell = "for epoch in range(2):\n    train_one_epoch()\n    sched.step()\n"
    found = discover(cell, ns)
    assert list(found.objects) == ["model", "opt", "val_loader.generator", "sched"]
    assert found.values[0] == "epoch"  # the cell's own first, then what the functions change
    assert set(found.values[1:]) == {"best_acc", "last_loss", "metrics", "history"}
    assert "ema" not in found.objects  # defined, but nothing the cell runs uses it
    run("ema.state_dict()\nfor epoch in range(1):\n    train_one_epoch()\n", ns)
    assert "ema" in discover("ema.load_state_dict(ema.state_dict())", ns).objects


def test_functions_reached_through_partials_methods_closures_and_decorators():
    ns = notebook(SETUP, """
        import functools
        def step(m, o, batch):
            o.zero_grad(); F.cross_entropy(m(batch[0]), batch[1]).backward(); o.step()
            log.append(1)
        log = []
        run_step = functools.partial(step, model, opt)

        class Trainer:
            def __init__(self, model):
                self.model = model
                self.opt = torch.optim.SGD(model.parameters(), lr=0.1)  # lives only on the trainer
            def fit(self, batch):
                self.step(batch)
                return counters
            def step(self, batch):
                self.model(batch[0]).sum().backward()
                self.opt.step()
        counters = {"fit": 0}
        trainer = Trainer(nn.Linear(4, 2))

        def make_closure():
            aux = nn.Linear(2, 2)
            def inner():
                return aux(torch.zeros(2))
            return inner
        closure = make_closure()

        def timed(fn):
            @functools.wraps(fn)
            def wrapper(*a, **k):
                return fn(*a, **k)
            return wrapper
        @timed
        def decorated():
            sched.step()
            return evaluate()

        @torch.no_grad()
        def evaluate():
            return ema_like.state_dict()
        ema_like = torch.optim.swa_utils.AveragedModel(nn.Linear(1, 1))

        class Callback:
            def __call__(self):
                scaler.update()
        callback = Callback()
    """)
    cell = """
        for batch in loader:
            run_step(batch)
            trainer.fit(batch)
            closure()
            decorated()
            callback()
    """
    found = discover(textwrap.dedent(cell), ns)
    assert found.objects["model"] is ns["model"] and found.objects["opt"] is ns["opt"]
    assert found.objects["trainer.model"] is ns["trainer"].model
    assert found.objects["trainer.opt"] is ns["trainer"].opt
    assert found.objects["closure.aux"] is not None
    assert "sched" in found.objects and "scaler" in found.objects
    assert "ema_like" in found.objects  # through @timed and torch.no_grad's wrappers
    assert "log" in found.values  # mutated by step(), reached through the partial
    assert "counters" not in found.values  # only read


def test_methods_of_a_users_model_class_are_followed():
    ns = notebook(SETUP, """
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Linear(4, 2)
                self.opt = torch.optim.SGD(self.body.parameters(), lr=0.1)  # not in state_dict()
            def fit(self, x):
                self.opt.step()
                history.append(float(self.body(x).sum()))
        net = Net()
    """)
    found = discover("for x, y in loader:\n    net.fit(x)\n", ns)
    assert found.objects == {"net": ns["net"], "net.opt": ns["net"].opt}
    assert found.values == ["x", "y", "history"]
    assert "net.body" not in found.objects  # a submodule: in the model's state_dict
    assert list(discover("net.opt.step()", ns).objects) == ["net", "net.opt"]
    # a scheduler's (or optimizer's) own attributes are not looked into
    assert list(discover("sched.optimizer.step()", ns).objects) == ["sched"]


def test_dedup_by_identity_and_aliases():
    ns = notebook(SETUP, "net = model\nencoder = model[0]\n_ = model\n")
    found = discover("for x, y in loader:\n    net(x)\n    encoder(x)\n    model(x)\n    _\n", ns)
    assert list(found.objects) == ["net"]
    assert found.aliases == {"encoder": "net.0", "model": "net"}
    assert found.describe() == "captured: net (Sequential; also model, encoder), x, y"


def test_dataloader_generators():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.arange(10.0))
    ns = {"g": g, "loader": DataLoader(data, batch_size=2, shuffle=True, generator=g),
          "plain": DataLoader(data, batch_size=2, shuffle=True),
          "sampler_loader": DataLoader(data, sampler=torch.utils.data.RandomSampler(
              data, generator=torch.Generator()))}
    found = discover("for b in loader: pass\nfor b in plain: pass\nfor b in sampler_loader: pass\n", ns)
    assert list(found.objects) == ["loader.generator", "sampler_loader.sampler.generator"]
    assert found.objects["loader.generator"] is g
    assert found.aliases == {}  # the same generator on loader.sampler is not reported twice
    both = discover("g.manual_seed(1)\nfor b in loader: pass\n", ns)
    assert list(both.objects) == ["g"] and both.aliases == {"loader.generator": "g"}
    assert "plain" not in found.skipped and "loader" not in found.skipped


def test_include_replaces_and_exclude_removes():
    ns = notebook(SETUP)
    cell = "for x, y in loader:\n    opt.step()\n    history.append(model(x).sum())\n    fresh = 1\n"
    only = discover(cell, ns, include=["model", "history", "fresh", "scaler"])
    assert list(only.objects) == ["model", "scaler"] and only.values == ["history", "fresh"]
    assert discover(cell, ns, include=["model,history"]).values == ["history"]  # --state a,b
    fewer = discover(cell, ns, exclude=["opt", "x", "y"])
    assert "opt" not in fewer.objects and fewer.values == ["history", "fresh"]
    ns["net"] = ns["model"]
    by_alias = discover("net(1)\nmodel(1)\n", ns, exclude=["model"])
    assert by_alias.objects == {} and by_alias.aliases == {}


def test_unknown_include_or_exclude_names_say_what_to_do():
    ns = notebook(SETUP)
    with pytest.raises(UsageError, match=r"histroy.*Check the spelling"):
        discover("history.append(1)", ns, include=["model", "histroy"])
    with pytest.raises(UsageError, match=r"--exclude names opz"):
        discover("opt.step()", ns, exclude=["opz"])
    with pytest.raises(UsageError, match=r"IPython's own"):
        discover("x = 1", ns, include=["_i3"])


def test_skipped_with_reasons(tmp_path):
    class Opaque:
        pass

    ns = notebook(SETUP)
    ns.update(math=math, Opaque=Opaque)
    cell = textwrap.dedent(f"""
        logger = logging.getLogger("train")
        fh = open({str(tmp_path / 'log.txt')!r}, "w")
        act = torch.relu
        mod = math
        Kind = Opaque
        boxed = [1, Opaque()]
        keyed = {{Opaque(): 1}}
        objs = np.array([None, 1], dtype=object)
        loop = []
        loop.append(loop)
        ok = {{"a": [1, 2.0, (3, None)], 4: torch.zeros(2), (1, 2): np.float32(1)}}
    """)
    ns.update(logging=logging, np=np)
    run(cell, ns)
    ns["fh"].close()
    found = discover(cell, ns)
    assert found.values == ["ok"]
    assert found.skipped == {
        "logger": "a Logger: not a training object or plain value",
        "fh": "an open file",
        "act": "a function",
        "mod": "a module",
        "Kind": "a class",
        "boxed": "a list holding a Opaque: not a training object or plain value",
        "keyed": "a dict with a Opaque key",
        "objs": "a numpy array of Python objects",
        "loop": "a list that contains itself",
    }


def test_ipython_and_private_names_are_ignored():
    ns = notebook(SETUP)
    ns.update({"In": [""], "Out": {1: ns["model"]}, "_": ns["model"], "_i3": "x = 1", "_oh": {},
               "_dh": ["/"], "exit": object(), "quit": object(), "get_ipython": lambda: None,
               "__nbguard__": object()})
    cell = "_ = model\n_tmp = 2\n__nbguard__.save()\nprint(In[-1], Out, _i3, _oh, _dh)\nexit\nget_ipython()\n"
    found = discover(cell, ns)
    assert list(found.objects) == ["model"] and found.aliases == {}
    assert found.values == [] and found.skipped == {}


def test_names_created_by_the_cell_are_listed_before_it_runs():
    ns = notebook("import torch\n")
    cell = "model = torch.nn.Linear(2, 2)\nopt = torch.optim.SGD(model.parameters(), lr=0.1)\nsteps = 0\n"
    before = discover(cell, ns)
    assert before.objects == {} and before.values == ["model", "opt", "steps"]
    run(cell, ns)
    after = discover(cell, ns)
    assert list(after.objects) == ["model", "opt"] and after.values == ["steps"]


def test_scopes_inside_the_cell():
    ns = notebook(SETUP, "loss = 'a global that is only shadowed'\n")
    cell = textwrap.dedent("""
        def step(x, y):
            global best_acc
            loss = F.cross_entropy(model(x), y)   # local
            best_acc = max(best_acc, -loss.item())
            history.append(loss.item())
            return loss
        scores = [s * 2 for s in range(3)]
        if (n := len(scores)) > 0:
            pass
        f = lambda opt: opt
        for x, y in loader:
            step(x, y)
    """)
    run(cell, ns)
    found = discover(cell, ns)
    assert "opt" not in found.objects  # only a lambda parameter
    assert "model" in found.objects
    assert found.values == ["best_acc", "history", "scores", "n", "x", "y"]  # not `loss`, `s`
    assert found.skipped == {"f": "a function"}  # a `def` is code the cell re-creates: not listed
    assert discover(ast.parse(cell), ns).values == found.values  # an AST works as well


def test_mutations_detected_in_function_bytecode():
    ns = notebook(SETUP, """
        stats = {"n": 0, "per": {}}
        grid = torch.zeros(3, 3)
        running = torch.zeros(1)
        gone = {"a": 1}
        order = [3, 1, 2]
        seen = set()
        def work(k):
            stats["n"] += 1
            stats["per"][k] = 1
            grid[k % 3, :] = X_train[k, 0]
            running.add_(y_train[k])
            del gone["a"]
            order.sort()
            return X_train[k] + y_train[k]
    """)
    found = discover("for k in range(2):\n    work(k)\n", ns)
    assert found.values == ["k", "stats", "grid", "running", "gone", "order"]
    assert "X_train" not in found.values and "y_train" not in found.values


def test_library_functions_are_not_followed_and_cycles_end():
    other_globals = {"model": torch.nn.Linear(1, 1), "history": []}
    exec("def foreign():\n    history.append(model)\n", other_globals)
    ns = notebook(SETUP, """
        def a(n):
            return b(n - 1) if n else opt
        def b(n):
            return a(n)
    """)
    ns["foreign"] = other_globals["foreign"]
    found = discover("a(3)\nforeign()\nimport json\njson.dumps({})\n", ns)
    assert list(found.objects) == ["opt"]
    assert found.values == []


def test_classify_kinds():
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)

    class EMA:
        def state_dict(self):
            return {}

        def load_state_dict(self, d):
            pass

    assert classify(lin) == "module"
    assert classify(opt) == "optimizer"
    assert classify(torch.optim.lr_scheduler.StepLR(opt, 1)) == "scheduler"
    assert classify(torch.optim.lr_scheduler.ReduceLROnPlateau(opt)) == "scheduler"
    assert classify(torch.amp.GradScaler("cpu")) == "scaler"
    assert classify(torch.Generator()) == "generator"
    assert classify(EMA()) == "stateful"
    for other in (EMA, torch.nn.Linear, torch.zeros(1), DataLoader([1]), mock.MagicMock(), 3, None):
        assert classify(other) is None


def test_training_objects_of_a_whole_namespace():
    ns = notebook(SETUP, """
        g = torch.Generator()
        loader2 = DataLoader(TensorDataset(X_train), shuffle=True, generator=g)
        head = model[2]
        alias = opt
    """)
    objs = training_objects(ns)
    assert list(objs) == ["model", "opt", "sched", "scaler", "g"]


def test_why_not_plain_accepts_plain_values():
    for value in (None, True, 3, 2.5, 1j, "s", b"b", torch.ones(2, requires_grad=True), np.zeros(3),
                  np.int64(4), [1, [2, (3.0, "x")]], {"a": {1: None, (2, "b"): torch.zeros(1)}}):
        assert why_not_plain(value) is None, value
    assert why_not_plain({1, 2}) == "a set: not a training object or plain value"


def test_describe_one_line():
    ns = notebook(SETUP, "import logging\nlogger = logging.getLogger('t')\n")
    found = discover("for x, y in loader:\n    opt.step()\n    sched.step()\n    model(x)\n"
                     "    history.append(1)\n    best_acc = 1.0\n    logger = logging.getLogger('u')\n", ns)
    assert found.describe() == (
        "captured: opt (Adam), sched (StepLR), model (Sequential), x, y, history, best_acc; "
        "skipped: logger (a Logger: not a training object or plain value)"
    )
    assert Discovery({}, [], {}).describe() == "captured: nothing"


def test_discovery_is_fast_on_a_big_namespace():
    ns = notebook(SETUP, "\n".join(f"def helper{i}():\n    return helper{i + 1}() + model" for i in range(300)))
    found = discover("helper0()\n", ns)
    assert list(found.objects) == ["model"]


def test_partial_keywords_and_functools():
    ns = notebook(SETUP)
    ns["go"] = functools.partial(lambda model=None: model, model=torch.nn.Linear(1, 1))
    found = discover("go()", ns)
    assert list(found.objects) == ["go.model"]


def test_a_real_ipython_namespace():
    from IPython.testing.globalipapp import get_ipython

    shell = get_ipython()
    assert shell.run_cell(textwrap.dedent("""
        import torch
        ipy_model = torch.nn.Linear(2, 2)
        ipy_opt = torch.optim.SGD(ipy_model.parameters(), lr=0.1)
        ipy_hist = []
        def ipy_step():
            global ipy_last
            ipy_opt.step()
            ipy_hist.append(1)
            ipy_last = 2
        ipy_model
    """)).success
    cell = shell.transform_cell("%time t = 1\nfor i in range(2):\n    ipy_step()\n    ipy_model(torch.zeros(2))\n_\n")
    found = discover(cell, shell.user_ns)
    assert list(found.objects) == ["ipy_opt", "ipy_model"] and found.aliases == {}  # not `_`, `_N`
    assert found.values == ["i", "ipy_last", "ipy_hist"]
