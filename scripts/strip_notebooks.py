#!/usr/bin/env python3
"""Strip outputs, execution counts and widget state from notebooks, so the repository holds only their source.

    python scripts/strip_notebooks.py                  strip notebooks/*.ipynb in place
    python scripts/strip_notebooks.py a.ipynb b.ipynb  strip these
    python scripts/strip_notebooks.py --check          change nothing; exit 1 naming each notebook that
                                                       still has outputs, execution counts or widget state

Needs only the standard library. Files are written the way Jupyter writes them (JSON, indent 1, sorted keys).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# Cell metadata that a run leaves behind (timings from nbclient/JupyterLab, Colab's output state).
RUN_METADATA = ("execution", "collapsed", "scrolled", "outputId", "colab")


def leftovers(nb: dict[str, Any]) -> list[str]:
    """What a run left in the notebook, in words (empty when it is clean)."""
    kinds: dict[str, list[int]] = {"outputs": [], "execution counts": [], "run metadata": []}
    for i, cell in enumerate(nb.get("cells", []), 1):
        if cell.get("cell_type") == "code":
            if cell.get("outputs"):
                kinds["outputs"].append(i)
            if cell.get("execution_count") is not None:
                kinds["execution counts"].append(i)
        if any(key in cell.get("metadata", {}) for key in RUN_METADATA):
            kinds["run metadata"].append(i)
    found = [f"{kind} in cell{'s' if len(cells) > 1 else ''} {', '.join(map(str, cells))}"
             for kind, cells in kinds.items() if cells]
    if "widgets" in nb.get("metadata", {}):
        found.append("widget state in the notebook metadata")
    return found


def strip(nb: dict[str, Any]) -> dict[str, Any]:
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        for key in RUN_METADATA:
            cell.get("metadata", {}).pop(key, None)
    nb.get("metadata", {}).pop("widgets", None)
    return nb


def dumps(nb: dict[str, Any]) -> str:
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if a notebook is not clean")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(NOTEBOOKS.glob("*.ipynb"))
    dirty = 0
    for path in paths:
        try:
            nb = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            print(f"{path}: cannot read it as a notebook ({exc})", file=sys.stderr)
            return 2
        found = leftovers(nb)
        if args.check:
            if found:
                dirty += 1
                print(f"{path}: {'; '.join(found)}")
            continue
        text = dumps(strip(nb))
        if text != path.read_text(encoding="utf-8"):
            path.write_text(text, encoding="utf-8")
            print(f"stripped {path}")
    if dirty:
        print(f"{dirty} notebook(s) hold outputs: run python scripts/strip_notebooks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
