"""What the panel's actions will do and what they did, as plain data and HTML: the restore plan
and the delete question (asked before), the restore report, an export's file and a comparison
(shown after), and which objects of a snapshot are exportable modules. No widgets, no IPython.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...format.manifest import SnapshotInfo
from ...humanize import ago, size
from .model import FONT, MONO, MUTED, RULE, TONE, esc, number

if TYPE_CHECKING:
    from ...engine.catalog import Comparison
    from ...engine.report import RestoreReport


def rng_streams(manifest: Mapping[str, Any]) -> list[str]:
    """Names of the RNG streams a snapshot holds, read from its manifest without loading tensors."""
    tree = manifest.get("rng")
    pairs = tree.get("$dict") if isinstance(tree, dict) else None
    return [key for key, _ in pairs if isinstance(key, str)] if isinstance(pairs, list) else []


def module_names(objects: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Objects of a snapshot that are module state_dicts (exportable weights): torch.nn types, or
    a stateful object whose state is a flat dict of tensors. Every stateful object when unsure."""
    stateful = [name for name, obj in objects.items() if obj.get("kind") == "stateful"]
    modules = [name for name in stateful if _looks_like_module(objects[name])]
    return modules or stateful


def _looks_like_module(obj: Mapping[str, Any]) -> bool:
    type_name = str(obj.get("type", ""))
    if type_name.startswith("torch.nn.") or type_name.endswith(("Module", "Net", "Model")):
        return True
    tree = obj.get("tree")
    pairs = tree.get("$dict") if isinstance(tree, dict) else None
    if not pairs:
        return False
    return all(isinstance(v, dict) and "$tensor" in v for _, v in pairs)


@dataclass(frozen=True)
class RestorePlan:
    """What restoring a snapshot will do to the kernel, before it is done."""

    info: SnapshotInfo
    replaced: tuple[tuple[str, str], ...]  # (name, what happens to it)
    created: tuple[str, ...]  # plain values that do not exist yet
    missing: tuple[str, ...]  # objects to load into that the kernel does not have
    rng: tuple[str, ...]

    def describe(self) -> str:
        lines = [f"Restore snapshot {self.info.id} (run {self.info.run}"
                 + (f", {self.info.label}" if self.info.label else "") + ")?"]
        if self.replaced:
            lines.append("Overwrites: " + "; ".join(f"{n} ({w})" for n, w in self.replaced))
        if self.created:
            lines.append("Creates: " + ", ".join(self.created))
        if self.rng:
            lines.append("Resets the random number generators: " + ", ".join(self.rng))
        lines.extend(missing_text(n) for n in self.missing)
        return "\n".join(lines)


def loads(obj: Mapping[str, Any]) -> str:
    """What restoring overwrites in an object, from its saved kind and type."""
    kind, type_name = obj.get("kind"), str(obj.get("type", ""))
    if kind == "value":
        return "the saved value"
    if kind == "generator":
        return "generator state"
    if type_name.startswith("torch.optim.lr_scheduler."):
        return "scheduler state"
    if type_name.startswith("torch.optim."):
        return "optimizer state"
    if "GradScaler" in type_name:
        return "grad scaler state"
    return "weights and buffers" if _looks_like_module(obj) else "state"


def missing_text(name: str) -> str:
    return f"{name} is not defined yet: run the cell that builds it first (it is skipped until then)"


def plan_restore(info: SnapshotInfo, manifest: Mapping[str, Any], namespace: Mapping[str, Any]) -> RestorePlan:
    replaced: list[tuple[str, str]] = []
    created: list[str] = []
    missing: list[str] = []
    for name, obj in manifest["objects"].items():
        live = namespace.get(name)
        kind = obj.get("kind")
        if live is None:
            (created if kind == "value" else missing).append(name)
        elif kind == "value":
            replaced.append((name, f"a {type(live).__name__} now, replaced by the saved value"))
        else:
            replaced.append((name, f"{type(live).__name__}: its {loads(obj)}"))
    return RestorePlan(info, tuple(replaced), tuple(created), tuple(missing), tuple(rng_streams(manifest)))


def _items(title: str, items: Iterable[str]) -> str:
    lis = "".join(f'<li style="margin:0">{item}</li>' for item in items)
    return f'<div style="margin-top:4px">{title}</div><ul style="margin:2px 0 0 18px;padding:0">{lis}</ul>' if lis else ""


def plan_html(plan: RestorePlan) -> str:
    info = plan.info
    where = f", {esc(info.label)}" if info.label else ""
    body = [f"<b>Restore snapshot {esc(info.id)}</b> (run {esc(info.run)}{where}, saved {esc(ago(info.created))})?",
            _items("This overwrites in your kernel:", [f"<code>{esc(n)}</code>: {esc(w)}" for n, w in plan.replaced]),
            _items("and creates:", [f"<code>{esc(n)}</code>" for n in plan.created])]
    if plan.rng:
        body.append(f'<div style="margin-top:4px">and resets the random number generators: {esc(", ".join(plan.rng))}.</div>')
    body.append(_items(f'<span style="color:{TONE["warn"]}">Not in your kernel:</span>',
                       [esc(missing_text(n)) for n in plan.missing]))
    return f'<div class="nbguard-confirm-text" style="{FONT}">{"".join(body)}</div>'


def delete_html(info: SnapshotInfo, url: str) -> str:
    pinned = " It is <b>pinned</b>." if info.pinned else ""
    where = f", {esc(info.label)}" if info.label else ""
    return (f'<div class="nbguard-confirm-text" style="{FONT}"><b>Delete snapshot {esc(info.id)}</b> '
            f"(run {esc(info.run)}{where}, {esc(size(info.size))})?{pinned} Its manifest and the tensor files no "
            f"other snapshot uses are removed from {esc(url)}; this cannot be undone.</div>")


def report_html(report: RestoreReport, objects: Mapping[str, Mapping[str, Any]]) -> str:
    """A RestoreReport in a few lines: each object, each RNG stream, the position, what was missing."""
    info = report.snapshot
    done = [f"<code>{esc(n)}</code> ({esc(t)}): {esc(loads(objects.get(n, {})))}" for n, t in report.restored]
    body = ['<div style="font-weight:600">What changed in the kernel</div>',
            _items(f"From snapshot {esc(info.id)} (run {esc(info.run)}):", done)]
    if report.rng:
        body.append(f'<div style="margin-top:4px">Random number generators: {esc(", ".join(report.rng))}</div>')
    if info.label:
        body.append(f'<div style="margin-top:4px">Loop position: {esc(info.label)}</div>')
    body.append(_items(f'<span style="color:{TONE["warn"]}">Not restored:</span>',
                       [esc(missing_text(n)) for n in report.missing]))
    body.append(_items("Notes:", [esc(n) for n in report.notes]))
    return (f'<div class="nbguard-report" style="{FONT};margin:4px 0;padding:4px 10px;'
            f'border-left:3px solid {TONE["warn" if report.missing else "ok"]}">{"".join(body)}</div>')


def export_html(module: str, snapshot_id: str, written: str) -> str:
    return (f'<div style="{FONT}">Weights of <code>{esc(module)}</code> from snapshot '
            f"{esc(snapshot_id)}: <code>{esc(written)}</code></div>")


def comparison_html(comparison: Comparison, top: int = 10) -> str:
    """Metrics side by side, then the tensors that changed most (relative change)."""
    a, b = comparison.a, comparison.b
    th = f"padding:3px 8px;{RULE};text-align:left;font-size:11px;font-weight:600;{MUTED}"
    td = f"padding:3px 8px;{RULE}"
    num = f"{td};text-align:right;font-variant-numeric:tabular-nums"
    out = [f'<div class="nbguard-compare" style="{FONT};padding:4px 0">',
           f"<b>{esc(a.id)}</b> ({esc(a.label or a.run)}) <span style='{MUTED}'>vs</span> "
           f"<b>{esc(b.id)}</b> ({esc(b.label or b.run)})"]
    if comparison.metrics:
        out.append('<table style="border-collapse:collapse;margin-top:4px"><tr>'
                   f'<th style="{th}">metric</th><th style="{th};text-align:right">first</th>'
                   f'<th style="{th};text-align:right">second</th><th style="{th};text-align:right">change</th></tr>')
        for name, x, y in comparison.metrics:
            change = number(y - x) if x is not None and y is not None else "—"
            if change not in ("—",) and not change.startswith("-"):
                change = "+" + change
            out.append(f'<tr><td style="{td}">{esc(name)}</td><td style="{num}">{number(x)}</td>'
                       f'<td style="{num}">{number(y)}</td><td style="{num}">{change}</td></tr>')
        out.append("</table>")
    changed = sorted(comparison.changed, key=lambda r: -r[2])
    out.append(f'<div style="margin-top:6px">{len(changed)} tensor{"s" if len(changed) != 1 else ""} changed, '
               f"{len(comparison.unchanged)} unchanged"
               + (f", {len(comparison.only_in_a)} only in the first" if comparison.only_in_a else "")
               + (f", {len(comparison.only_in_b)} only in the second" if comparison.only_in_b else "") + "</div>")
    if changed:
        out.append(f'<table style="border-collapse:collapse;margin-top:4px;width:100%;table-layout:fixed">'
                   f'<colgroup><col><col style="width:110px"><col style="width:110px"><col style="width:140px"></colgroup>'
                   f'<tr><th style="{th}">tensor (top {min(top, len(changed))} by relative change)</th>'
                   f'<th style="{th};text-align:right">max |Δ|</th><th style="{th};text-align:right">relative</th>'
                   f'<th style="{th}"></th></tr>')
        for name, max_abs, rel in changed[:top]:
            width = 100 if not math.isfinite(rel) else min(100, max(1, round(100 * rel / max(changed[0][2], 1e-12))))
            bar = (f'<div style="height:7px;border-radius:3px;background:#90caf9;width:{width}%"></div>'
                   if math.isfinite(changed[0][2]) else "")
            what = "shape changed" if not math.isfinite(max_abs) else number(max_abs)
            out.append(f'<tr><td style="{td};{MONO};overflow:hidden;text-overflow:ellipsis;white-space:nowrap" '
                       f'title="{esc(name)}">{esc(name)}</td><td style="{num}">{what}</td>'
                       f'<td style="{num}">{_percent(rel)}</td><td style="{td}">{bar}</td></tr>')
        out.append("</table>")
    out.append("</div>")
    return "".join(out)


def _percent(rel: float) -> str:
    if not math.isfinite(rel):
        return "—"
    return f"{rel * 100:.3g} %"
