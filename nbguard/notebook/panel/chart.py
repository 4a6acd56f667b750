"""An inline SVG chart of a run's metrics over time, one small panel per metric, snapshots marked.

No plotting library: a few lines, circles and labels are all it takes, and an SVG string renders
in any front end that shows HTML (JupyterLab, classic Notebook, Colab, VS Code).
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence

from ...format.manifest import SnapshotInfo
from .model import FONT, MUTED, metric_mode, number, seconds

COLORS = ("#1976d2", "#e65100", "#6a1b9a")
SELECTED = "#111111"
BEST = "#2e7d32"
MAX_MARKERS = 300  # beyond this, only the selected and the best snapshot get a marker


def nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    """Round tick values (1, 2, 5 × 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step) * step
    ticks: list[float] = []
    value = first
    while value < hi + step * 0.999 and len(ticks) < 12:
        ticks.append(round(value, 12))
        value += step
    return ticks


def time_labels(t0: float, t1: float) -> list[tuple[float, str]]:
    """Where and what to write under the x axis: the first time, then offsets or times."""
    if t1 <= t0:
        return [(t0, time.strftime("%H:%M:%S", time.localtime(t0)))]
    span = t1 - t0
    stamps = [t0, (t0 + t1) / 2, t1]
    if span < 120:  # clock times would all read the same: say how long after the first
        return [(t0, time.strftime("%H:%M:%S", time.localtime(t0)))] + [(t, f"+{seconds(t - t0)}") for t in stamps[1:]]
    fmt = "%H:%M" if span < 86400 else "%b %d"
    return [(t, time.strftime(fmt, time.localtime(t))) for t in stamps]


def chart_svg(infos: Sequence[SnapshotInfo], *, selected: str | None = None, best: str | None = None,
              width: int = 780, height: int = 150, max_metrics: int = 3, title: str = "") -> str:
    """HTML with an SVG of up to ``max_metrics`` metrics of ``infos`` (one run) against save time."""
    points = sorted(infos, key=lambda s: (s.created, s.id))
    names: list[str] = []
    for info in reversed(points):  # the newest snapshot's metrics first
        names.extend(n for n in info.metrics if n not in names)
    series = {n: [(s, float(s.metrics[n])) for s in points if _finite(s.metrics.get(n))] for n in names}
    names = [n for n in names if series[n]][:max_metrics]
    if not names:
        return (f'<div class="nbguard-chart" style="{FONT};{MUTED};padding:6px 0">No metrics in this run yet: '
                "save with <code>metrics={'loss': loss}</code> to see them over time here.</div>")
    gap = 18
    panel_w = (width - gap * (len(names) - 1)) / len(names)
    times = [s.created for n in names for s, _ in series[n]]
    t0, t1 = min(times), max(times)
    parts = [f'<svg class="nbguard-chart-svg" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" style="max-width:100%;height:auto;display:block" '
             'font-family="var(--jp-ui-font-family, sans-serif)" font-size="11">']
    for i, name in enumerate(names):
        parts.append(_panel(name, series[name], i * (panel_w + gap), panel_w, height, t0, t1,
                            COLORS[i % len(COLORS)], selected, best))
    parts.append("</svg>")
    legend = (f'<div style="{FONT};{MUTED};font-size:11.5px">{html.escape(title)}'
              f' <span style="color:{SELECTED}">◯</span> selected snapshot'
              f' <span style="color:{BEST}">●</span> best</div>')
    return f'<div class="nbguard-chart" style="padding:4px 0">{legend}{"".join(parts)}</div>'


def _finite(value: object) -> bool:
    # Sentinels such as -sys.float_info.max are stored, not drawn: they would flatten every other point
    # (and overflow the axis arithmetic).
    return isinstance(value, (int, float)) and abs(value) < 1e300


def _panel(name: str, points: list[tuple[SnapshotInfo, float]], x0: float, w: float, h: float,
           t0: float, t1: float, color: str, selected: str | None, best: str | None) -> str:
    left, right, top, bottom, inset = 48, 10, 18, 20, 10
    plot_w, plot_h = max(10.0, w - left - right), max(10.0, h - top - bottom)
    values = [v for _, v in points]
    ticks = nice_ticks(min(values), max(values))
    lo, hi = ticks[0], ticks[-1]

    def x(t: float) -> float:
        return x0 + left + (plot_w / 2 if t1 == t0 else inset + (t - t0) / (t1 - t0) * (plot_w - 2 * inset))

    def y(v: float) -> float:
        return top + plot_h - (v - lo) / (hi - lo) * plot_h

    arrow = "lower is better" if metric_mode(name) == "min" else "higher is better"
    out = [f'<text x="{x0 + left:.1f}" y="12" font-weight="600" fill="currentColor">{html.escape(name)}'
           f'<tspan font-weight="400" fill="#777"> · {arrow}</tspan></text>']
    for tick in ticks:
        ty = y(tick)
        out.append(f'<line x1="{x0 + left:.1f}" x2="{x0 + left + plot_w:.1f}" y1="{ty:.1f}" y2="{ty:.1f}" '
                   'stroke="rgba(128,128,128,0.22)" stroke-width="1"/>')
        out.append(f'<text x="{x0 + left - 5:.1f}" y="{ty + 3.5:.1f}" text-anchor="end" fill="#666">'
                   f"{number(tick)}</text>")
    labels = time_labels(t0, t1)
    for j, (stamp, text) in enumerate(labels):
        anchor = "middle" if len(labels) == 1 or j == 1 else ("start" if j == 0 else "end")
        out.append(f'<text x="{x(stamp):.1f}" y="{h - 5:.1f}" text-anchor="{anchor}" fill="#666">{text}</text>')
    if len(points) > 1:
        path = " ".join(f"{x(s.created):.1f},{y(v):.1f}" for s, v in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6"/>')
    for s, v in points:
        special = s.id in (selected, best)
        if len(points) > MAX_MARKERS and not special:
            continue
        tip = html.escape(f"{s.label or s.id} · {name} {number(v)} · {time.strftime('%H:%M:%S', time.localtime(s.created))}")
        fill = BEST if s.id == best else color
        out.append(f'<circle cx="{x(s.created):.1f}" cy="{y(v):.1f}" r="{4 if special else 3}" fill="{fill}">'
                   f"<title>{tip}</title></circle>")
        if s.id == selected:
            out.append(f'<circle cx="{x(s.created):.1f}" cy="{y(v):.1f}" r="7" fill="none" stroke="{SELECTED}" '
                       'stroke-width="1.5"/>')
    return "<g>" + "".join(out) + "</g>"
