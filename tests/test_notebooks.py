"""The teaching notebooks, executed for real: top to bottom in a fresh kernel each, 01 and 02 also killed
(SIGKILL) in the middle of their training cell and run again, 03 against the Drive API emulator.

Each notebook runs in its own tmp folder with ``NBGUARD_DIR`` there, one torch thread (two cores shared
with the test process), and this venv's Python as the kernel.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError

import nbguard
from tests.drive_emulator import DriveEmulator
from tests.kernel_harness import Kernel

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01_quickstart", "02_survive_a_disconnect", "03_google_drive", "04_best_and_compare",
         "05_fine_tune_frozen_backbone", "06_training_in_functions"]
CELL_TIMEOUT = 240


def kernel_env(folder: Path, **extra: str) -> dict[str, str]:
    """The kernel's environment: snapshots, staging and the notebook's own files under ``folder``."""
    venv_bin = os.path.dirname(sys.executable)
    return {
        **os.environ,
        "NBGUARD_DIR": str(folder / "snapshots"),
        "NBGUARD_STAGING": str(folder / "staging"),
        "OMP_NUM_THREADS": "1",  # two cores, shared with this process: more threads only wait on each other
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),  # `!nbguard ...` finds this venv's CLI
        **extra,
    }


def load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def execute(nb: nbformat.NotebookNode, folder: Path, **env: str) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel with ``folder`` as its working folder; CellExecutionError on any error."""
    folder.mkdir(parents=True, exist_ok=True)
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT, startup_timeout=120,
                            resources={"metadata": {"path": str(folder)}})
    client.execute(env=kernel_env(folder, **env))
    return nb


def text_of(cell: nbformat.NotebookNode) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
        elif out.get("output_type") == "error":
            parts.append("\n".join(out["traceback"]))
    return "".join(parts)


def outputs(nb: nbformat.NotebookNode) -> str:
    return "\n".join(text_of(c) for c in nb.cells if c.cell_type == "code")


def training_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("%%checkpointed")]
    assert len(cells) == 1, "expected one %%checkpointed cell"
    return cells[0]


def fingerprint(text: str) -> str:
    found = re.findall(r"fingerprint: ([0-9a-f]{16})\b", text)
    assert found, f"no fingerprint in the output:\n{text[-3000:]}"
    return found[-1]


def snapshots_in(folder: Path) -> list[str]:
    return glob.glob(str(folder / "snapshots" / "runs" / "*" / "snapshots" / "*.json"))


class Run(NamedTuple):
    nb: nbformat.NotebookNode  # the executed notebook, outputs included
    folder: Path  # its working folder


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    """Each notebook executed once, uninterrupted (memoized: the kill tests compare against these)."""
    done: dict[str, Run] = {}

    def run(name: str) -> Run:
        if name not in done:
            folder = tmp_path_factory.mktemp(name)
            done[name] = Run(execute(load(name), folder), folder)
        return done[name]

    return run


# -- the repository holds stripped notebooks ---------------------------------------------------------------
def test_notebooks_in_the_repository_hold_no_outputs():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "strip_notebooks.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


def test_strip_check_fails_on_an_executed_notebook(plain_runs, tmp_path):
    path = tmp_path / "executed.ipynb"
    nbformat.write(plain_runs("01_quickstart").nb, path)
    script = str(ROOT / "scripts" / "strip_notebooks.py")
    checked = subprocess.run([sys.executable, script, "--check", str(path)], capture_output=True, text=True)
    assert checked.returncode == 1 and "outputs in cells" in checked.stdout, checked.stdout
    assert "widget state" in checked.stdout  # the panel's widget left its state behind
    subprocess.run([sys.executable, script, str(path)], check=True, capture_output=True)
    assert subprocess.run([sys.executable, script, "--check", str(path)]).returncode == 0
    stripped = nbformat.read(path, as_version=4)
    assert [c.source for c in stripped.cells] == [c.source for c in load("01_quickstart").cells]


def test_every_notebook_opens_in_colab_and_installs_only_when_missing():
    for name in NAMES:
        nb = load(name)
        assert f"colab.research.google.com/github/nbguard/nbguard/blob/main/notebooks/{name}.ipynb" in nb.cells[0].source
        first_code = next(c for c in nb.cells if c.cell_type == "code").source
        assert first_code.count("%pip install") == 1 and "except ImportError:" in first_code, name


# -- every notebook, top to bottom ---------------------------------------------------------------------
def test_01_quickstart(plain_runs):
    nb = plain_runs("01_quickstart").nb
    out = outputs(nb)
    assert "nbguard: snapshots of this notebook go to" in out
    train = text_of(training_cell(nb))
    assert "nbguard: captured: " in train and "model (Sequential)" in train and "opt (Adam)" in train
    assert "finished" in out and "[final]" in out  # %nbguard list
    panel = [o for c in nb.cells for o in c.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert panel, "the panel was not displayed"
    fingerprint(out)


def test_01_quickstart_killed_mid_training_resumes_to_the_same_result(plain_runs, tmp_path):
    """Run cell by cell; SIGKILL the kernel once the training cell has saved a snapshot; start a fresh
    kernel and run every cell again: the fingerprint equals the uninterrupted run's."""
    expected = fingerprint(outputs(plain_runs("01_quickstart").nb))
    cells = [c.source for c in load("01_quickstart").cells if c.cell_type == "code"]
    # A shorter timer than the notebook's 2 s, so that a snapshot exists well before training ends on any
    # machine. Both kernels run the same source: a changed cell would not resume from its old snapshots.
    cells = [c.replace("%%checkpointed --every 2s", "%%checkpointed --every 0.5s", 1) for c in cells]
    assert sum(c.startswith("%%checkpointed --every 0.5s") for c in cells) == 1
    kernel = Kernel(str(tmp_path), env=kernel_env(tmp_path))
    try:
        for source in cells:
            if source.startswith("%%checkpointed"):
                out, _ = kernel.run(source, timeout=CELL_TIMEOUT, until=lambda _: bool(snapshots_in(tmp_path)))
                assert "epoch 15/15" not in out, "training ended before the kill: make the training cell longer"
                kernel.kill()
                break
            _, error = kernel.run(source, timeout=CELL_TIMEOUT)
            assert error is None, source
        kernel.restart()
        texts = []
        for source in cells:
            out, error = kernel.run(source, timeout=CELL_TIMEOUT)
            assert error is None, f"{source}\n{out}"
            texts.append(out)
    finally:
        kernel.shutdown()
    joined = "".join(texts)
    assert "snapshot found" in joined or "snapshots found" in joined, joined[:2000]
    assert "nbguard: resumed from snapshot" in joined, joined
    assert fingerprint(joined) == expected


def test_02_survive_a_disconnect(plain_runs):
    nb = plain_runs("02_survive_a_disconnect").nb
    out = outputs(nb)
    assert "The plug will be pulled" not in out  # the drill is off unless asked for
    assert "resumed == uninterrupted:      True" in out
    assert "weights only == uninterrupted: False" in out
    assert "guarded run == uninterrupted: True" in out
    svg = [o for c in nb.cells for o in c.get("outputs", []) if "image/svg+xml" in o.get("data", {})]
    assert len(svg) == 1 and svg[0]["data"]["image/svg+xml"].count("<polyline") == 3


def test_02_the_drill_kills_the_kernel_and_run_all_resumes_to_the_same_result(plain_runs, tmp_path):
    """The notebook's own drill: PULL_THE_PLUG = True kills the kernel half-way through training (SIGKILL);
    "Run all" again in a fresh kernel resumes and ends with the uninterrupted run's fingerprint."""
    expected = fingerprint(outputs(plain_runs("02_survive_a_disconnect").nb))
    nb = load("02_survive_a_disconnect")
    flag = [c for c in nb.cells if c.cell_type == "code" and "PULL_THE_PLUG = False" in c.source]
    assert len(flag) == 1
    flag[0].source = flag[0].source.replace("PULL_THE_PLUG = False", "PULL_THE_PLUG = True")

    with pytest.raises(DeadKernelError):
        execute(copy.deepcopy(nb), tmp_path)
    assert (tmp_path / "drill-done.txt").exists()
    assert snapshots_in(tmp_path), "the kernel died before nbguard saved anything"

    done = execute(copy.deepcopy(nb), tmp_path)
    train = text_of(training_cell(done))
    assert "nbguard: resumed from snapshot" in train, train
    assert "epoch 1/" not in train, train  # it continued; it did not start over
    out = outputs(done)
    assert "guarded run == uninterrupted: True" in out
    assert fingerprint(out) == expected


def test_03_google_drive_through_the_api_emulator(tmp_path):
    with DriveEmulator() as emulator:
        credentials = tmp_path / "credentials.json"
        credentials.write_text(json.dumps(emulator.authorized_user_info()))
        nb = execute(load("03_google_drive"), tmp_path / "work", NBGUARD_DRIVE_API_ROOT=emulator.url,
                     NBGUARD_DRIVE_CREDENTIALS=str(credentials))
        assert not emulator.errors, emulator.errors[0]
        titles = [f["title"] for f in emulator.files(include_trashed=False)]
    out = outputs(nb)
    assert "Not on Colab" in out
    assert "snapshots of this notebook now go to Google Drive, folder nbguard/03_google_drive" in out
    assert "waiting for the uploads to finish" in out
    final_list = text_of(nb.cells[[i for i, c in enumerate(nb.cells) if "store.flush(" in c.source][0]])
    rows = [line for line in final_list.splitlines() if re.match(r"\d{8}T\d{6}-", line)]
    assert rows, final_list
    assert all(re.search(r"\ssafe in Drive(\s+\[final\])?$", line.rstrip()) for line in rows), final_list
    assert "03_google_drive" in titles and sum(t.endswith(".json") for t in titles) == len(rows)
    assert "nbguard: removed 0 unused blob(s)" in out
    assert not snapshots_in(tmp_path / "work"), "with the Drive API connected, nothing goes to NBGUARD_DIR"


def test_04_best_and_compare(plain_runs):
    nb = plain_runs("04_best_and_compare").nb
    out = outputs(nb)
    best_line = re.search(r"the best snapshot: (\S+) \((after epoch \d+ of 20)\), validation loss ([\d.]+)", out)
    assert best_line, out
    assert re.search(rf"{best_line[1]}\s+{best_line[2]}\s+val_loss {best_line[3]}\s+best pinned", out), out
    assert "tensors changed:" in out and "model/0.weight   moved by" in out
    assert "the two files hold the same weights: True" in out
    fresh = re.search(r"validation loss in a fresh process: ([\d.]+)", out)
    assert fresh and fresh[1] == best_line[3], out
    printed = [float(v) for v in re.findall(r"validation loss ([\d.]+)\n", text_of(training_cell(nb)))]
    assert len(printed) == 20 and float(best_line[3]) < printed[-1]  # it overfits: the best is not the last


def test_04_exports_standard_safetensors(plain_runs):
    safetensors = pytest.importorskip("safetensors.torch")
    work = plain_runs("04_best_and_compare").folder
    weights = safetensors.load_file(str(work / "best-model.safetensors"))
    assert sorted(weights) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
    catalog = nbguard.Catalog(str(work / "snapshots-04"))
    assert [s.id for s in catalog.snapshots() if s.pinned] == [catalog.find("best:val_loss").id]


def test_05_fine_tune_frozen_backbone_writes_the_backbone_once(plain_runs):
    nb, work = plain_runs("05_fine_tune_frozen_backbone")
    snapshots = sorted(nbguard.Catalog(str(work / "snapshots-05")).snapshots(), key=lambda s: s.created)
    assert len(snapshots) >= 3, [s.label for s in snapshots]
    first, later = snapshots[0], snapshots[1:]
    assert first.written >= 0.95 * first.size > 2 << 20  # the 2 MiB backbone, written once
    assert all(s.written < 0.05 * s.size for s in later), [(s.label, s.written, s.size) for s in later]
    out = outputs(nb)
    assert f"{len(snapshots)} snapshots of" in out and "written in all" in out




def test_a_kernel_next_to_the_default_snapshot_folder_still_loads_nbguard(tmp_path):
    """Jupyter's default: snapshots in nbguard-snapshots/<notebook> next to the notebook (not nbguard/, which
    would shadow the package for editable installs). After a restart the kernel starts in that folder."""
    (tmp_path / "nbguard-snapshots" / "01_quickstart" / "runs").mkdir(parents=True)
    env = kernel_env(tmp_path)
    del env["NBGUARD_DIR"]
    kernel = Kernel(str(tmp_path), env=env)
    try:
        out, error = kernel.run("%load_ext nbguard")
    finally:
        kernel.shutdown()
    assert error is None and "snapshots of this notebook go to" in out and "nbguard-snapshots" in out, out


def test_06_training_in_functions(plain_runs):
    nb = plain_runs("06_training_in_functions").nb
    out = outputs(nb)
    # a snapshot taken inside train_loop()'s batch loop, listed with its batch
    listed = text_of(next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("%nbguard list")))
    assert "batch" in listed, listed
    assert "no training loop nbguard can reach: fake_library.fit()" in out
    assert "Training complete" in out
    fingerprint(out)
