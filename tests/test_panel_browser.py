"""The panel in a real JupyterLab and Chromium: train and save, restart the kernel, rebuild the model
with other weights, restore a snapshot by clicking in the panel, and check the weights bit for bit."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest

from tests import browser_harness as harness

pytestmark = [pytest.mark.e2e, pytest.mark.browser,
              pytest.mark.skipif(harness.missing() is not None, reason=harness.missing() or "")]

REPO = Path(__file__).resolve().parent.parent
SNAPSHOTS = "snaps"

SETUP = """\
import hashlib
import torch
from torch import nn
import nbguard

DIR = "snaps"

def build(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)

def weights_hash(model):
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
"""

TRAIN = """\
def train(run, epochs, seed, tags_at=None):
    model, opt = build(seed)
    x = torch.randn(512, 8)
    y = (x[:, 0] + x[:, 1] > 0).long()
    guard = nbguard.Guard(DIR, run=run, keep=10, report=None)
    history = []
    for epoch in range(1, epochs + 1):
        for i in range(0, 512, 64):
            loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()
        history.append(loss.item())
        guard.save({"model": model, "opt": opt, "history": history}, metrics={"loss": loss.item(), "acc": acc},
                   position={"epoch": epoch}, tags=(tags_at or {}).get(epoch, ())).wait()
    guard.close()
    return guard

train("baseline", 2, seed=3, tags_at={2: ["interrupted"]})
guard = train("mlp-adam", 4, seed=0, tags_at={4: ["final"]})
guard.catalog.pin(guard.snapshots()[-1].id, "mlp-adam")
print("saved", len(guard.catalog.snapshots()))
"""

REBUILD = """\
print("model defined after restart:", "model" in globals())
model, opt = build(seed=1)
history = []
print("before", weights_hash(model))
"""

PANEL = """\
p = nbguard.panel(DIR, namespace=globals(), place_text="snaps/ on this machine's disk: it survives a disconnect, not a lost VM")
p
"""

CHECK = """\
print("after", weights_hash(model))
print("history", len(history))
"""

LIVE = """\
g = nbguard.Guard(DIR, run="mlp-adam", keep=10, report=None)
p.refresh()  # the panel now also listens to g's catalog
g.save({"model": model, "opt": opt}, metrics={"loss": 0.01, "acc": 0.99}, position={"epoch": 5}).result().id
"""


def weights_hash(state: dict) -> str:
    h = hashlib.sha256()
    for name, tensor in state.items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def write_notebook(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(src)) for src in (SETUP, TRAIN, REBUILD, PANEL, CHECK, LIVE)]
    nbformat.write(nb, str(path))


@pytest.mark.timeout(180)
def test_restore_by_clicking_in_jupyterlab(tmp_path):
    import nbguard

    root = tmp_path / "lab"
    root.mkdir()
    write_notebook(root / "panel.ipynb")
    with harness.JupyterLab(root, tmp_path / "jupyter") as lab, harness.chromium() as browser:
        page = browser.new_page(viewport={"width": 1000, "height": 1500})
        nb = harness.LabNotebook.open(page, lab, "panel.ipynb")
        width = nb.fit_width(900)
        nb.run_cell(0)
        nb.run_cell(1)
        assert "saved 6" in nb.output_text(1)

        nb.restart_kernel()
        nb.run_cell(0)
        nb.run_cell(2)
        text = nb.output_text(2)
        assert "model defined after restart: False" in text
        before = text.split("before ", 1)[1].split()[0]

        catalog = nbguard.Catalog(root / SNAPSHOTS)
        snapshots = catalog.snapshots()
        assert len(snapshots) == 6
        target = next(s for s in snapshots if s.run == "mlp-adam" and s.position == {"epoch": 2})
        expected = weights_hash(catalog.get(target.id).state_dict("model"))
        assert before != expected

        nb.run_cell(3)
        panel = nb.output(3).locator(".nbguard-panel")
        panel.wait_for(timeout=30_000)
        rows = panel.locator("tr.nbguard-row")
        rows.first.wait_for()
        assert rows.count() == 6
        shown = [rows.nth(i).get_attribute("data-snapshot") for i in range(rows.count())]
        newest_run_first = [s.id for s in snapshots if s.run == "mlp-adam"] + [s.id for s in snapshots if s.run == "baseline"]
        assert shown == newest_run_first
        assert panel.locator("tr.nbguard-run").all_inner_texts()[0].startswith("run mlp-adam")
        badges = panel.locator("tr.nbguard-row").nth(0).locator(".nbguard-badge").all_inner_texts()
        assert "latest" in badges and "final" in badges
        first_epoch = next(s for s in snapshots if s.run == "mlp-adam" and s.position == {"epoch": 1})
        assert "pinned" in panel.locator(f'tr[data-snapshot="{first_epoch.id}"] .nbguard-badge').all_inner_texts()

        pick = panel.locator(".nbguard-pick select")
        labels = [label.replace("\xa0", " ") for label in pick.locator("option").all_inner_texts()]
        index = next(i for i, label in enumerate(labels) if "mlp-adam" in label and "epoch 2" in label)
        pick.select_option(index=index)
        page.wait_for_selector(f'.nbguard-panel tr.nbguard-selected[data-snapshot="{target.id}"]', timeout=15_000)

        panel.locator("button.nbguard-restore").click()
        question = panel.locator(".nbguard-confirm-text")
        question.wait_for(timeout=15_000)
        assert target.id in question.inner_text()
        assert "model" in question.inner_text() and "torch" in question.inner_text()
        artifacts = REPO / "artifacts"
        artifacts.mkdir(exist_ok=True)
        panel.screenshot(path=str(artifacts / "panel-confirm.png"))
        panel.locator("button.nbguard-confirm").click()
        report = panel.locator(".nbguard-report")
        report.wait_for(timeout=30_000)
        assert f"Restored snapshot {target.id} (epoch 2)." in panel.locator(".nbguard-status").inner_text()
        assert target.id in report.inner_text() and "Loop position: epoch 2" in report.inner_text()

        panel.scroll_into_view_if_needed()
        panel.screenshot(path=str(artifacts / "panel.png"))
        harness.copy_if_wanted(artifacts / "panel.png", REPO / "docs" / "panel.png")

        overflow = panel.evaluate("el => [el.scrollWidth, el.clientWidth]")
        assert overflow[0] <= overflow[1] + 1, f"the panel overflows a {width} px notebook: {overflow}"
        for table in panel.locator(".nbguard-table").all():
            sw, cw = table.evaluate("el => [el.scrollWidth, el.clientWidth]")
            assert sw <= cw + 1, f"the table overflows: {sw} > {cw}"

        nb.run_cell(4)
        text = nb.output_text(4)
        assert f"after {expected}" in text
        assert "history 2" in text

        nb.run_cell(5)  # a save while the panel is on screen: the row appears without a refresh
        new_id = nb.outputs(5)[-1]["data"]["text/plain"].strip("'")
        page.wait_for_selector(f'.nbguard-panel tr.nbguard-row[data-snapshot="{new_id}"]', timeout=15_000)
        assert rows.count() == 7 and rows.first.get_attribute("data-snapshot") == new_id
