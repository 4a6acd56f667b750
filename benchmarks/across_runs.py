"""Several runs of ``benchmarks.run`` side by side: per target, the median over runs, their range and
how many runs met it (what the README's tables report).

    python -m benchmarks.across_runs RESULT.json [RESULT.json ...]

Each argument is a run's JSON (``latest.json``, or a copy under ``benchmarks/results/``) or the
folder holding its ``latest.json``. Runs of different state sizes are refused: their ratios do not
mix.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Any


def load(path: str) -> dict[str, Any]:
    """One run's results, from its JSON or the folder holding ``latest.json``."""
    if os.path.isdir(path):
        path = os.path.join(path, "latest.json")
    with open(path) as f:
        return json.load(f)


def across(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target (in the first run's order): every run's ratio, their median and range, and the runs
    that met it. A target a run lacks counts as not met by that run."""
    sizes = {r.get("size_gib") for r in runs}
    if len(sizes) > 1:
        raise ValueError(f"runs of different state sizes ({sorted(map(str, sizes))}): compare one size at a time")
    names = list(dict.fromkeys(t["target"] for r in runs for t in r.get("targets", [])))
    rows = []
    for name in names:
        found = [next((t for t in r.get("targets", []) if t["target"] == name), None) for r in runs]
        values = [t["value"] for t in found if t is not None and t["value"] is not None]
        rows.append({"target": name, "values": values,
                     "median": statistics.median(values) if values else None,
                     "min": min(values, default=None), "max": max(values, default=None),
                     "met": sum(1 for t in found if t is not None and t["status"] == "PASS"),
                     "measured": sum(1 for t in found if t is not None and t["status"] in ("PASS", "MISS")),
                     "runs": len(runs)})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | median (range) | runs that met it |", "|---|---|---|"]
    for row in rows:
        if row["median"] is None:
            figure = "—"
        else:
            figure = f"{row['median']:.2f} ({row['min']:.2f}–{row['max']:.2f})"
        lines.append(f"| {row['target']} | {figure} | {row['met']} of {row['measured']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        rows = across([load(p) for p in paths])
    except (OSError, ValueError) as exc:
        print(f"benchmarks.across_runs: {exc}", file=sys.stderr)
        return 2
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
