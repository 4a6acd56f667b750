"""The restore panel without a browser: real stores and snapshots, widgets driven through their
public methods and through ``Button.click()``, assertions on widget values and on the kernel state."""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch import nn

import nbguard
from nbguard.format.manifest import encode_manifest, manifest_path, new_id, parse_manifest
from nbguard.notebook.panel import action_text, model
from nbguard.notebook.panel.chart import chart_svg, nice_ticks

pytest.importorskip("ipywidgets")


def build(seed: int, hidden: int = 8) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    return net, torch.optim.Adam(net.parameters(), lr=1e-2)


def train(guard: nbguard.Guard, epochs: int, seed: int, tags: dict[int, list[str]] | None = None) -> None:
    net, opt = build(seed)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(seed))
    y = (x[:, 0] > 0).long()
    history: list[float] = []
    for epoch in range(1, epochs + 1):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(round(loss.item(), 6))
        guard.save({"model": net, "opt": opt, "history": history}, metrics={"loss": loss.item(), "acc": 0.5 + epoch / 20},
                   position={"epoch": epoch}, tags=(tags or {}).get(epoch, ()), wait=True)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Two runs: 'base' (2 snapshots, the last interrupted), then 'mlp' (4, the last final)."""
    folder = tmp_path_factory.mktemp("template") / "snaps"
    for run, epochs, seed, tags in (("base", 2, 5, {2: ["interrupted"]}), ("mlp", 4, 0, {4: ["final"]})):
        guard = nbguard.Guard(folder, run=run, keep=10, report=None)
        train(guard, epochs, seed, tags)
        guard.close()
    return folder


@pytest.fixture
def store(template, tmp_path):
    """A private copy of the template store, and a Guard of run 'mlp' writing to it."""
    folder = tmp_path / "snaps"
    shutil.copytree(template, folder)
    guard = nbguard.Guard(folder, run="mlp", keep=10, report=None)
    yield folder, guard
    guard.close()


def snap(folder, run: str, epoch: int) -> nbguard.SnapshotInfo:
    return next(s for s in nbguard.Catalog(folder).snapshots(run) if s.position == {"epoch": epoch})


def rows_in(html: str) -> int:
    return html.count('class="nbguard-row')


# -- what it shows ----------------------------------------------------------------------------------
def test_rows_grouped_by_run_with_badges_and_header(store):
    folder, guard = store
    from nbguard.notebook.panel import Panel

    p = nbguard.panel(folder, namespace={}, guard=guard)
    assert isinstance(p, Panel) and p.widget._repr_mimebundle_() is not None
    assert callable(nbguard.panel)
    assert [(r.run, r.position) for r in p.rows] == [("mlp", "epoch 4"), ("mlp", "epoch 3"), ("mlp", "epoch 2"),
                                                   ("mlp", "epoch 1"), ("base", "epoch 2"), ("base", "epoch 1")]
    assert rows_in(p.table.value) == 6
    assert p.table.value.index("run mlp") < p.table.value.index("run base")
    badges = {(r.run, r.position): r.badges for r in p.rows}
    assert set(badges["mlp", "epoch 4"]) >= {"latest", "final"}
    assert "interrupted" in badges["base", "epoch 2"] and "latest" in badges["base", "epoch 2"]
    losses = {r.position: float(dict(r.metrics)["loss"]) for r in p.rows if r.run == "mlp"}
    best = min(losses, key=losses.get)
    assert "best" in badges["mlp", best]
    assert sum("best" in b for b in badges.values()) == 2  # one per run
    assert all(r.size.endswith("KiB") and r.storage == "on disk" and r.when for r in p.rows)
    assert '<span class="nbguard-badge"' in p.table.value and "text-align:right" in p.table.value
    header = p.header.value
    assert str(folder) in header and "6 snapshots in 2 runs" in header and "used" in header
    assert "idle, nothing saved by this kernel yet" in header
    assert p.page_label.value == "page 1 of 1 · 1–6 of 6"
    assert p.prev_button.disabled and p.next_button.disabled
    assert [v for _, v in p.pick.options] == [r.id for r in p.rows] and p.pick.value == p.rows[0].id
    assert "<svg" in p.chart.value and "loss" in p.chart.value and "acc" in p.chart.value
    assert p.status_text == ""


def test_place_text_writer_errors_and_empty_store(tmp_path):
    p = nbguard.panel(tmp_path / "nothing", namespace={}, place_text="Drive (survives a disconnect)")
    assert "Drive (survives a disconnect)" in p.header.value
    assert p.rows == [] and "No snapshots here yet" in p.table.value
    assert p.restore_button.disabled and p.delete_button.disabled
    p.restore_button.click()  # disabled in the browser; from code it still must not raise
    assert p.status_tone == "error" and "no snapshot is selected" in p.status_text

    class Broken:
        busy, last_saved, last_stats = False, None, None
        last_error = nbguard.StoreError("No space left on device: /content/snaps")
        catalog = nbguard.Catalog(tmp_path / "nothing")
        store = catalog.store

    p = nbguard.panel(namespace={}, guard=Broken())
    assert "the last save failed: No space left on device" in p.header.value


# -- restoring --------------------------------------------------------------------------------------
def test_restore_by_clicking_asks_then_restores_bitwise(store):
    folder, guard = store
    target = snap(folder, "mlp", 2)
    net, opt = build(seed=99)
    ns = {"model": net, "opt": opt, "unrelated": 1}
    restored = []
    p = nbguard.panel(folder, namespace=ns, on_restore=restored.append)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    p.select(target.id)
    assert p.selected == target.id and 'nbguard-row nbguard-selected" data-snapshot="' + target.id in p.table.value
    p.restore_button.click()
    assert p.confirm_box.layout.display == "flex"
    question = p.confirm_text.value
    assert target.id in question and "model" in question and "opt" in question
    assert "history" in question and "creates" in question  # a value the kernel does not have yet
    assert "python, numpy, torch" in question
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "asking must not change anything"
    assert "history" not in ns

    p.confirm_button.click()
    saved = nbguard.Catalog(folder).get(target.id)
    for key, value in saved.state_dict("model").items():
        live = net.state_dict()[key]
        assert live.dtype == value.dtype and live.shape == value.shape
        assert live.contiguous().view(torch.uint8).tolist() == value.contiguous().view(torch.uint8).tolist()
    assert ns["model"] is net and ns["opt"] is opt  # loaded in place
    assert ns["history"] == saved.value("history") and len(ns["history"]) == 2
    assert opt.state_dict()["state"][0]["step"].item() == 2
    assert ns["unrelated"] == 1
    assert restored == [target]
    assert p.status_tone == "ok" and p.status_text == f"Restored snapshot {target.id} (epoch 2)."
    assert p.confirm_box.layout.display == "none" and p.progress.layout.display == "none"
    assert p.progress.value == 100
    report = p.result.value
    assert "weights and buffers" in report and "optimizer state" in report and "the saved value" in report
    assert "python, numpy, torch" in report and "Loop position: epoch 2" in report


def test_restore_of_the_guards_own_snapshot_goes_through_its_staging_memory(tmp_path):
    """The panel of a running session restores a snapshot of the session's store through its guard,
    as ``%nbguard restore`` does: read into the guard's warm staging buffers, which then change places
    with the live tensors' memory, and the next save descends from it. A snapshot of another store
    is restored on its own."""
    net, opt = build(seed=1)
    x = torch.randn(16, 4)

    def step() -> None:
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()

    state = {"model": net, "opt": opt}
    step()
    guard = nbguard.Guard(tmp_path / "own", run="r", report=None)
    first = guard.save(state, wait=True).result()
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    step()
    guard.save(state, wait=True).result()  # every staging buffer is warm
    other = nbguard.Guard(tmp_path / "other", run="r", report=None)
    foreign = other.save(state, wait=True).result()
    other.close()
    try:
        step()
        buffers = {b.data_ptr() for b in guard._staging._buffers.values()}
        p = nbguard.panel(tmp_path / "own", namespace=dict(state), guard=guard)
        p.select(first.id)
        p.restore_button.click()
        p.confirm_button.click()
        assert p.status_tone == "ok", p.status_text
        assert all(torch.equal(v, expected[k]) for k, v in net.state_dict().items())
        assert net[0].weight.data_ptr() in buffers  # the staging memory became the live tensor's
        assert guard.parent == first.id and p.progress.value == 100
        p.close()

        step()
        p = nbguard.panel(tmp_path / "other", namespace=dict(state), guard=guard)
        p.select(foreign.id)
        p.restore_button.click()
        p.confirm_button.click()
        assert p.status_tone == "ok", p.status_text
        assert guard.parent == first.id  # not the guard's snapshot: restored without it
        p.close()
    finally:
        guard.close()


def test_restore_into_a_model_of_another_shape_changes_nothing(store):
    folder, _ = store
    net, opt = build(seed=1, hidden=16)
    history = ["mine"]
    ns = {"model": net, "opt": opt, "history": history}
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    p = nbguard.panel(folder, namespace=ns)
    assert p.restore(snap(folder, "mlp", 3).id, confirm=True) is None
    assert p.status_tone == "error"
    assert p.status_text.startswith("Could not restore the snapshot: model.0.weight has shape [8, 4]")
    assert "build the model with the same sizes" in p.status_text
    assert isinstance(p.last_error, nbguard.RestoreError)
    assert "nbguard-status" in p.status.value and "Could not restore" in p.status.value
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    assert ns["history"] is history and history == ["mine"] and opt.state_dict()["state"] == {}
    assert torch.equal(torch.get_rng_state(), rng)


def test_objects_missing_from_the_kernel_are_named(store):
    folder, _ = store
    ns: dict = {}
    p = nbguard.panel(folder, namespace=ns)
    plan = p.restore()
    assert plan.missing == ("model", "opt") and plan.created == ("history",)
    assert "model is not defined yet: run the cell that builds it first" in p.confirm_text.value
    report = p.confirm()
    assert report.missing == ["model", "opt"] and "history" in ns
    assert p.status_tone == "warn" and "except model, opt" in p.status_text
    assert "model is not defined yet: run the cell that builds it first" in p.result.value


def test_without_a_namespace_restore_says_how_to_get_one(store):
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.clear_instance()  # a shell left by an earlier test would lend its namespace
    folder, _ = store
    p = nbguard.panel(folder)  # no IPython here: no namespace
    assert p.namespace is None
    p.restore_button.click()
    assert "namespace=globals()" in p.status_text and p.status_tone == "error"


def test_on_restore_failure_is_shown(store):
    folder, _ = store
    net, opt = build(0)

    def boom(info):
        raise ValueError("magic layer unhappy")

    p = nbguard.panel(folder, namespace={"model": net, "opt": opt}, on_restore=boom)
    assert p.restore(confirm=True) is not None
    assert "on_restore failed: ValueError: magic layer unhappy" in p.status_text


def test_a_snapshot_deleted_elsewhere_gives_a_plain_error(store):
    folder, _ = store
    p = nbguard.panel(folder, namespace={})
    nbguard.Catalog(folder).delete(p.selected)
    p.restore_button.click()
    assert p.status_tone == "error" and p.status_text.startswith("Could not restore the snapshot:")


# -- pin, delete, export, compare ---------------------------------------------------------------------
def test_pin_unpin_and_delete_with_confirmation(store):
    folder, _ = store
    p = nbguard.panel(folder, namespace={})
    p.select(snap(folder, "mlp", 3).id)
    chosen = p.selected
    p.pin_button.click()
    assert nbguard.Catalog(folder).find(chosen).pinned
    assert "pinned" in p.rows[1].badges and p.pin_button.description == "Unpin"
    assert "Pinned snapshot" in p.status_text
    p.pin_button.click()
    assert not nbguard.Catalog(folder).find(chosen).pinned and p.pin_button.description == "Pin"

    p.delete_button.click()
    assert p.confirm_box.layout.display == "flex" and "cannot be undone" in p.confirm_text.value
    p.cancel_button.click()
    assert nbguard.Catalog(folder).find(chosen) and "nothing was changed" in p.status_text
    p.delete_button.click()
    p.confirm_button.click()
    assert chosen not in {s.id for s in nbguard.Catalog(folder).snapshots()}
    assert len(p.rows) == 5 and rows_in(p.table.value) == 5
    assert p.selected == snap(folder, "mlp", 2).id  # the next older one
    assert p.status_text == f"Deleted snapshot {chosen}."


def test_export_writes_the_module_weights(store, tmp_path):
    from safetensors.torch import load_file

    folder, _ = store
    p = nbguard.panel(folder, namespace={})
    p.export_button.click()
    assert p.export_module.value == "model" and len(p.export_module.options) == 1 and p.export_box.layout.display == "flex"
    out = tmp_path / "out" / "weights.safetensors"
    out.parent.mkdir()
    p.export_path.value = str(out)
    p.export_go.click()
    assert out.exists() and str(out) in p.status_text and p.status_tone == "ok"
    saved = nbguard.Catalog(folder).get(p.selected).state_dict("model")
    loaded = load_file(str(out))
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert p.export(module="opt", path=str(tmp_path / "x.safetensors")) is None
    assert p.status_tone == "error" and "Could not export the weights" in p.status_text


def test_compare_shows_metrics_and_top_changes(store):
    folder, _ = store
    p = nbguard.panel(folder, namespace={})
    p.compare_button.click()
    assert p.compare_with.value == snap(folder, "mlp", 3).id  # the previous snapshot of the run
    p.compare_go.click()
    html = p.result.value
    assert "nbguard-compare" in html and "loss" in html and "acc" in html and "max |Δ|" in html
    assert html.count("<tr><td") <= 2 + 10
    assert p.status_text.startswith(f"Compared {snap(folder, 'mlp', 3).id} with {snap(folder, 'mlp', 4).id}")
    cmp = p.compare(snap(folder, "mlp", 1).id, snap(folder, "base", 1).id)
    assert isinstance(cmp, nbguard.Comparison) and cmp.metrics[0][0] == "acc"


# -- many snapshots ---------------------------------------------------------------------------------
def clone_snapshots(folder, count: int) -> list[str]:
    """``count`` more snapshots made by copying one real manifest (same tensors; new ids, times, metrics)."""
    template = parse_manifest((folder / snap(folder, "mlp", 1).path).read_bytes())
    start = time.time() - 3 * 86400
    ids = []
    for i in range(count):
        m = copy.deepcopy(template)
        m["created"] = start + i * 60
        m["id"] = new_id(m["created"])
        m["run"] = "long" if i % 10 else "side"
        m["metrics"] = {"loss": 1 / (i + 1), "acc": math.tanh(i / 300)}
        m["position"] = {"$dict": [["step", i]]} if isinstance(m["position"], dict) else m["position"]
        path = folder / manifest_path(m["run"], m["id"])  # plain writes: 1,000 fsyncs would dominate the test
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_manifest(m))
        ids.append(m["id"])
    return ids


def test_a_thousand_snapshots_are_paged(store):
    folder, _ = store
    clone_snapshots(folder, 1000)
    started = time.perf_counter()
    p = nbguard.panel(folder, namespace={}, page_size=20)
    opened = time.perf_counter() - started
    assert len(p.snapshots) == 1006
    assert len(p.rows) == 20 and rows_in(p.table.value) == 20 and len(p.pick.options) == 20
    assert p.page_label.value == "page 1 of 51 · 1–20 of 1,006"
    assert len(p.table.value) < 60_000  # one page of HTML, whatever the total
    p.next_button.click()
    assert [r.number for r in p.rows] == list(range(21, 41)) and p.selected == p.rows[0].id
    far = p.snapshots[733]
    p.select(far.id)
    assert p.page.number == 36 and far.id in [r.id for r in p.rows]
    p.show_page(0)
    assert p.prev_button.disabled
    p.show_page(1000)
    assert p.page.number == 50 and len(p.rows) == 6 and p.next_button.disabled
    started = time.perf_counter()
    p.refresh()
    refreshed = time.perf_counter() - started
    print(f"1006 snapshots: open {opened:.2f} s, refresh {refreshed:.2f} s")
    p.show_run("side")
    assert {r.run for r in p.rows} == {"side"} and len(p.snapshots) == 100
    assert p.chart.value.count("<circle") == 2 * (100 + 1)  # two metrics, each with a selection ring


# -- live updates -----------------------------------------------------------------------------------
def test_a_save_from_another_thread_shows_up_by_itself(store):
    folder, guard = store
    net, opt = build(7)
    p = nbguard.panel(folder, namespace={}, guard=guard)
    p.throttle = 0.05
    assert not p.process_pending()
    saved = []
    thread = threading.Thread(target=lambda: saved.append(
        guard.save({"model": net, "opt": opt}, metrics={"loss": 0.01}, position={"epoch": 5}).result()))
    thread.start()
    thread.join(10)
    guard.flush()  # 'saved' is announced once retention has run
    assert p.wait_for_refresh(10)
    assert len(p.rows) == 7 and p.rows[0].id == saved[0].id and p.rows[0].position == "epoch 5"
    assert "best" in p.rows[0].badges and "latest" in p.rows[0].badges
    assert "idle; last snapshot just now (epoch 5), durable after" in p.header.value


def test_a_panel_opened_by_path_hears_a_guard_in_the_namespace(store):
    folder, guard = store
    net, opt = build(7)
    p = nbguard.panel(str(folder), namespace={"guard": guard})
    assert p.catalog is not guard.catalog
    p.throttle = 0.05
    guard.save({"model": net}, metrics={"loss": 0.5}, position={"epoch": 9}, wait=True)  # 'saved' is sent
    assert p.wait_for_refresh(10)
    assert p.rows[0].position == "epoch 9"
    p.close()
    guard.save({"model": net}, position={"epoch": 10}, wait=True)
    assert not p.process_pending() and p.rows[0].position == "epoch 9"


def test_the_listener_never_waits_for_the_panel(store, monkeypatch):
    folder, guard = store
    p = nbguard.panel(folder, namespace={}, guard=guard)
    p.throttle = 0.05
    real = p.catalog.snapshots
    monkeypatch.setattr(p.catalog, "snapshots", lambda run=None: (time.sleep(0.5), real(run))[1])
    started = time.perf_counter()
    for _ in range(20):
        guard.catalog.notify("state", None)
    assert time.perf_counter() - started < 0.05
    assert p.wait_for_refresh(10) and not p.process_pending()


# -- the UI-free parts ----------------------------------------------------------------------------------
def info(i: int, run: str = "r", **metrics: float) -> nbguard.SnapshotInfo:
    return nbguard.SnapshotInfo(id=f"20260101T0000{i:02d}-000-abcd", run=run, created=1_700_000_000 + i * 60,
                                position={"epoch": i}, metrics=metrics, note=None, tags=(), size=1000 * i,
                                written=0, objects=("model",))


def test_model_formats_and_ranks():
    assert [model.number(x) for x in (0.123456, 12345678.0, 3, None, math.nan)] == ["0.1235", "1.235e+07", "3", "—", "—"]
    assert model.metric_mode("val_loss") == "min" and model.metric_mode("top1_error") == "min"
    assert model.metric_mode("acc") == "max"
    snaps = [info(1, loss=0.5, acc=0.9), info(2, loss=math.nan, acc=0.95), info(3, loss=0.4, acc=0.7)]
    assert model.badges(snaps)[snaps[2].id] == ("latest", "best")  # min loss, nan ignored
    assert "best" in model.badges(snaps, "acc")[snaps[1].id]
    assert model.badges([info(1, loss=1.0)])[info(1).id] == ("latest",)  # no 'best' out of one
    assert model.paginate(0, 3, 20).text == "no snapshots"
    assert model.paginate(41, 9, 20) == model.Page(2, 3, 40, 41, 41)
    assert model.storage_label("verified", "replicated") == ("safe in Drive", "ok")
    assert model.storage_label("local", "replicated") == ("local only", "warn")
    assert model.storage_label("written, sync pending", "replicated")[0] == "written, sync pending"
    assert model.storage_label("uploading", "replicated")[0] == "uploading"
    assert model.writer_status(True, None, None)[0].startswith("writing")
    assert action_text.rng_streams({"rng": {"$dict": [["python", []], ["torch", {"$tensor": "rng/torch"}]]}}) == ["python", "torch"]
    assert action_text.module_names({"m": {"kind": "stateful", "type": "__main__.Net", "tree": {"$dict": [["w", {"$tensor": "k"}]]}},
                               "opt": {"kind": "stateful", "type": "torch.optim.adam.Adam", "tree": {}},
                               "h": {"kind": "value", "type": "builtins.list", "tree": []}}) == ["m"]
    assert "&lt;b&gt;" in model.table_html([model.make_row(info(1, run="r"), 1, (), time.time())],
                                           run_notes={"r": "<b>"})


def test_best_is_never_an_accumulator():
    from nbguard.training import metric_names

    snaps = [info(1, total=1033.0, running=3.2), info(2, total=1200.0, running=2.9), info(3, total=1500.0, running=2.1)]
    assert all("best" not in marks for marks in model.badges(snaps).values())  # no --best, no named metric
    assert "best" not in model.run_notes(snaps)["r"]
    named = [info(1, total=10.0, val_acc=0.7), info(2, total=20.0, val_acc=0.9), info(3, total=30.0, val_acc=0.8)]
    assert model.badges(named)[named[1].id] == ("best",) and "best val_acc 0.9 (max)" in model.run_notes(named)["r"]
    assert "best" in model.badges(snaps, "running:min")[snaps[2].id]  # asked for: ranked
    assert [n for n in ("val_loss", "acc", "testAcc", "f1", "top1_error", "loss") if metric_names.is_metric(n)] == \
        ["val_loss", "acc", "testAcc", "f1", "top1_error", "loss"]
    assert not any(metric_names.is_metric(n) for n in ("total", "running", "running_loss", "loss_sum", "n", "lr", "x"))


def test_chart_handles_none_one_many_and_nan():
    assert "No metrics" in chart_svg([info(1)])
    one = chart_svg([info(1, loss=0.5)], selected=info(1).id)
    assert one.count("<circle") == 2 and "nan" not in one  # the point and the selection ring
    many = chart_svg([info(i, loss=1 / i, acc=math.nan if i == 3 else i / 10) for i in range(1, 8)])
    assert "<polyline" in many and many.count("<svg") == 1 and "nan" not in many.lower()
    assert "lower is better" in many and "higher is better" in many
    lots = chart_svg([info(i % 60, loss=float(i)) for i in range(1000)])
    assert lots.count("<circle") == 0 and lots.count("<polyline") == 1
    ticks = nice_ticks(0.0312, 0.0871)
    assert ticks[0] <= 0.0312 and ticks[-1] >= 0.0871 and 3 <= len(ticks) <= 6
    assert len({round(b - a, 9) for a, b in zip(ticks, ticks[1:], strict=False)}) == 1
    assert nice_ticks(1.0, 1.0)[0] < 1.0 < nice_ticks(1.0, 1.0)[-1]


def test_import_nbguard_stays_free_of_notebook_packages():
    code = ("import sys, nbguard, nbguard.notebook.panel.model, nbguard.notebook.panel.chart; "
            "bad = [m for m in ('ipywidgets', 'IPython') if m in sys.modules]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)


def test_manifest_clone_helper_writes_valid_manifests(store):
    folder, _ = store
    ids = clone_snapshots(folder, 3)
    assert all(json.loads(nbguard.open_store(folder).read(manifest_path(r, i)))["id"] == i
               for r, i in zip(("side", "long", "long"), ids, strict=True))


def test_the_controller_works_without_ipywidgets():
    code = """
import sys
import torch
import nbguard
from nbguard.notebook.panel.controller import PanelController

store = nbguard.MemoryStore("controller-test")
guard = nbguard.Guard(store, run="r", report=None)
weights = torch.nn.Linear(2, 2)
info = guard.save({"model": weights, "step": 1}, wait=True)
ns = {"model": torch.nn.Linear(2, 2)}
c = PanelController(nbguard.Catalog(store), namespace=ns, guard=guard)
assert c.selected == info.id and len(c.rows) == 1, c.status_text
assert c.pin().pinned and "Pinned" in c.status_text
plan = c.restore()
assert plan.created == ("step",) and c.form == "confirm" and c.question.action == "restore"
report = c.confirm()
assert report.restored and ns["step"] == 1 and c.status_tone == "ok", c.status_text
assert torch.equal(ns["model"].weight, weights.weight) and "nbguard-report" in c.result_html
c.close()
assert "ipywidgets" not in sys.modules and "IPython" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
