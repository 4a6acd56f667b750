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

# Modules of the notebook layer and the command line: the core must never import them.
UPPER_LAYERS = ("magics", "ui", "cli")
# Optional parts, loaded only on demand (with an install hint when their packages are missing).
OPTIONAL_PARTS = ("nbguard.drive",)
HEAVY_OPTIONAL = ("IPython", "ipywidgets", "ipykernel", "pydrive2", "googleapiclient", "google.auth", "traitlets")


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
    upper = [m for m in modules if any(m == f"nbguard.{u}" or m.startswith(f"nbguard.{u}.") for u in UPPER_LAYERS)]
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


def _core_modules() -> list[Path]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if any(part in UPPER_LAYERS or part.startswith(tuple(f"{u}_" for u in UPPER_LAYERS)) for part in parts):
            continue
        out.append(path)
    return out


@pytest.mark.parametrize("path", _core_modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_the_core_never_imports_the_notebook_layer(path):
    module_name = "nbguard." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    tree = ast.parse(path.read_text(), filename=str(path))
    # The package's __init__ may import the magics/panel lazily inside the functions that
    # %load_ext and nbguard.panel() call; everywhere else no import of them at all.
    top_level_only = path.name == "__init__.py" and path.parent == PACKAGE
    bad = [(line, target) for line, target in _imports(tree, module_name, top_level_only=top_level_only)
           if any(target == f"nbguard.{u}" or target.startswith(f"nbguard.{u}.") for u in UPPER_LAYERS)]
    assert bad == [], f"{module_name} imports the notebook layer: {bad}"
    if module_name.startswith(OPTIONAL_PARTS):
        return  # an optional part may import its own dependencies; it is itself loaded lazily
    heavy = [(line, target) for line, target in _imports(tree, module_name, top_level_only=True)
             if any(target == h or target.startswith(h + ".") for h in HEAVY_OPTIONAL)]
    assert heavy == [], f"{module_name} imports an optional package at import time: {heavy}"


def test_the_scan_sees_imports():
    """The scanner itself: relative, absolute and nested imports are all found."""
    tree = ast.parse("from . import magics\nimport nbguard.ui\ndef f():\n    from .cli import main\n")
    found = {t for _, t in _imports(tree, "nbguard.guard", top_level_only=False)}
    assert {"nbguard.magics", "nbguard.ui", "nbguard.cli.main"} <= found
    top = {t for _, t in _imports(tree, "nbguard.guard", top_level_only=True)}
    assert "nbguard.cli.main" not in top
