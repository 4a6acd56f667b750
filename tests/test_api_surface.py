"""The public surface: a curated ``__all__``, a light ``import nbguard``, and layers that point one way."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nbguard

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nbguard"

EXPORTED = [
    "CaptureError",
    "Catalog",
    "Comparison",
    "CorruptSnapshotError",
    "FsspecStore",
    "GcReport",
    "Guard",
    "LocalStore",
    "MemoryStore",
    "NbguardError",
    "Policy",
    "RestoreError",
    "RestoreReport",
    "SaveHandle",
    "SaveStats",
    "Snapshot",
    "SnapshotError",
    "SnapshotInfo",
    "Store",
    "StoreError",
    "UsageError",
    "__version__",
    "checkpointed",
    "default_dir",
    "load",
    "load_ipython_extension",
    "load_weights",
    "open_store",
    "panel",
    "unload_ipython_extension",
]

# The layers, top to bottom: a module may import its own layer and the layers below it, never
# one above (docs/ARCHITECTURE.md). format and stores share a level: format reads through the
# stores' direct-I/O helpers, stores never import format.
LAYERS = {
    "base": 0,  # errors, version, humanize
    "stores": 1,
    "format": 2,
    "engine": 3,
    "training": 4,
    "notebook": 5,
    "front": 6,  # the package's __init__, cli, demo
}
BASE_MODULES = ("errors", "version", "humanize")
UPPER_LAYERS = ("notebook", "cli", "demo")  # never loaded by `import nbguard` and a save/restore
# Optional parts, loaded only on demand (with an install hint when their packages are missing).
OPTIONAL_PARTS = ("nbguard.stores.drive",)
HEAVY_OPTIONAL = ("IPython", "ipywidgets", "ipykernel", "pydrive2", "googleapiclient", "google.auth", "traitlets")


def layer_of(module: str) -> str:
    """'engine' for nbguard.engine.guard; 'front' for nbguard itself, cli and demo."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("cli", "demo"):
        return "front"
    return "base" if parts[1] in BASE_MODULES else parts[1]


def test_all_is_exactly_the_curated_list():
    assert sorted(nbguard.__all__) == sorted(EXPORTED)
    assert len(set(nbguard.__all__)) == len(nbguard.__all__)


@pytest.mark.parametrize("name", EXPORTED)
def test_every_exported_name_resolves(name):
    value = getattr(nbguard, name)
    assert value is not None
    if name != "__version__":
        assert callable(value)
        module = getattr(value, "__module__", "")
        assert module == "nbguard" or module.startswith("nbguard."), f"{name} comes from {module}"


def test_error_tree():
    assert issubclass(nbguard.CorruptSnapshotError, nbguard.SnapshotError)
    for name in ("CaptureError", "SnapshotError", "RestoreError", "StoreError", "UsageError"):
        assert issubclass(getattr(nbguard, name), nbguard.NbguardError)
    assert issubclass(nbguard.NbguardError, Exception)


def test_version_matches_the_package_metadata():
    text = (REPO / "pyproject.toml").read_text()
    assert f'version = "{nbguard.__version__}"' in text


PROBE = """
import json, sys
import nbguard
guard = nbguard.Guard(nbguard.MemoryStore(), run="probe", report=None)
guard.save({"x": 1}, wait=True)
guard.restore()
nbguard.Catalog(nbguard.MemoryStore()).snapshots()
print(json.dumps(sorted(sys.modules)))
"""


def test_import_nbguard_pulls_in_no_notebook_or_drive_packages():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    loaded = [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY_OPTIONAL)]
    assert loaded == [], f"import nbguard (and a save and restore) loaded {loaded}"
    upper = [m for m in modules if m.startswith("nbguard.") and (layer_of(m) == "notebook" or m in ("nbguard.cli", "nbguard.demo"))]
    assert upper == []


def _imports(tree: ast.AST, module_name: str, *, top_level_only: bool) -> list[tuple[int, str]]:
    """(line, absolute module) for each import in a module's AST."""
    nodes = ast.iter_child_nodes(tree) if top_level_only else ast.walk(tree)
    package = module_name.rsplit(".", 1)[0] if not module_name.endswith("__init__") else module_name
    package = package.removesuffix(".__init__")
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(("nbguard", *parts)).removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _runtime_imports(path: Path, module_name: str) -> set[str]:
    """nbguard modules a module imports at run time (function-level too; not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    name = module_name + ".__init__" if path.name == "__init__.py" else module_name
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only or not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        targets = [t for _, t in _imports(ast.Module(body=[node], type_ignores=[]), name, top_level_only=True)]
        for target in targets:
            if any(other.startswith(target + ".") and other in MODULES for other in targets):
                continue  # `from . import retry`: the module retry, not its package
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and not module_name.startswith(target):  # itself or its own packages
                found.add(target)
    return found


GRAPH = {name: _runtime_imports(path, name) for name, path in MODULES.items()}


@pytest.mark.parametrize("module_name", sorted(MODULES))
def test_dependencies_point_down_the_layers(module_name):
    own = layer_of(module_name)
    up = sorted(t for t in GRAPH[module_name] if LAYERS[layer_of(t)] > LAYERS[own])
    assert up == [], f"{module_name} ({own}) imports a layer above it: {up}"
    if own == "stores":
        assert not [t for t in GRAPH[module_name] if layer_of(t) == "format"], f"{module_name} imports format"


def test_no_import_cycles():
    """Tarjan's strongly connected components over the run-time import graph: none has two modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    monkeypatch.setitem(GRAPH, "nbguard.errors", {"nbguard.engine.guard"})
    with pytest.raises(AssertionError):
        test_no_import_cycles()


@pytest.mark.parametrize("module_name", sorted(m for m in MODULES if layer_of(m) not in UPPER_LAYERS and m != "nbguard"))
def test_no_optional_package_at_import_time(module_name):
    if module_name.startswith(OPTIONAL_PARTS):
        return  # an optional part may import its own dependencies; it is itself loaded lazily
    tree = ast.parse(MODULES[module_name].read_text())
    name = module_name + ".__init__" if MODULES[module_name].name == "__init__.py" else module_name
    heavy = [(line, target) for line, target in _imports(tree, name, top_level_only=True)
             if any(target == h or target.startswith(h + ".") for h in HEAVY_OPTIONAL)]
    assert heavy == [], f"{module_name} imports an optional package at import time: {heavy}"


def test_the_scan_sees_imports():
    """The scanner itself: relative, absolute and nested imports are all found."""
    tree = ast.parse("from .. import cli\nimport nbguard.notebook.panel\ndef f():\n    from ..cli import main\n")
    found = {t for _, t in _imports(tree, "nbguard.engine.guard", top_level_only=False)}
    assert {"nbguard.cli", "nbguard.notebook.panel", "nbguard.cli.main"} <= found
    top = {t for _, t in _imports(tree, "nbguard.engine.guard", top_level_only=True)}
    assert "nbguard.cli.main" not in top
