"""What the panel shows, as plain data and HTML strings: no widgets, no IPython.

Everything here is a pure function of catalog data (like tqdm's ``format_meter``), so it is tested
without a front end and the widget only copies results onto traits. Work over all snapshots is
O(n) and cheap (badges, grouping, paging); rows and HTML are built for one page only.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...engine.retention import best_of
from ...format.manifest import SnapshotInfo
from ...humanize import ago, clock, duration, size
from ...stores.base import Staged
from ...training import metric_names

BADGES = ("latest", "best", "pinned", "final", "interrupted")
LOWER_IS_BETTER = ("loss", "err", "perplexity", "mse", "mae")
MAX_METRIC_COLUMNS = 3

MUTED = "color:var(--jp-ui-font-color2,#6b6b6b)"
MONO = "font-family:var(--jp-code-font-family,ui-monospace,Menlo,Consolas,monospace);font-size:11.5px"
RULE = "border-bottom:1px solid var(--jp-border-color2,#e4e4e4)"
FONT = ("font-family:var(--jp-ui-font-family,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif);"
        "font-size:12.5px;line-height:1.45;color:var(--jp-ui-font-color1,#222);white-space:normal")

# (background, text) of each badge and tone; light-theme colors that stay readable on dark.
PILL = {
    "latest": ("#e3f2fd", "#0d47a1"),
    "best": ("#e6f4ea", "#1b5e20"),
    "pinned": ("#ede7f6", "#4527a0"),
    "final": ("#eceff1", "#37474f"),
    "interrupted": ("#fff3e0", "#b34700"),
}
TONE = {"ok": "#2e7d32", "warn": "#c25e00", "busy": "#1565c0", "error": "#c62828", "plain": "#757575"}


# -- numbers and words --------------------------------------------------------------------------
def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def number(value: float | None) -> str:
    """'0.2314', '12.35', '1.235e+05'; '—' for a missing or non-finite value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, int) and abs(value) < 10**6:
        return str(value)
    return f"{value:.4g}"


def seconds(value: float) -> str:
    """'35 ms', '2.4 s', '3 min 20 s'."""
    return f"{value * 1000:.0f} ms" if value < 1 else duration(value)


def metric_mode(name: str) -> str:
    """'min' for loss- and error-like metric names, else 'max' (the retention policy's rule)."""
    return "min" if any(word in name.lower() for word in LOWER_IS_BETTER) else "max"


def parse_metric(spec: str | None) -> tuple[str, str] | None:
    """'val_loss' → ('val_loss', 'min'); 'acc:max' → ('acc', 'max'); None stays None."""
    if not spec:
        return None
    name, _, mode = spec.partition(":")
    return name, mode if mode in ("min", "max") else metric_mode(name)


def short_clock(timestamp: float, now: float) -> str:
    """'10:15:03' today, 'Nov 24 10:15' this year, else '2025-11-24 10:15'."""
    then, today = time.localtime(timestamp), time.localtime(now)
    if then[:3] == today[:3]:
        return time.strftime("%H:%M:%S", then)
    return time.strftime("%b %d %H:%M" if then.tm_year == today.tm_year else "%Y-%m-%d %H:%M", then)


def storage_label(state: str, kind: str = "disk", remote: str = "Drive") -> tuple[str, str]:
    """The words and tone of a snapshot's durability. ``kind``: 'replicated' (a local copy plus a
    remote one), 'memory', or 'disk' (a plain folder: it lasts as long as that folder does)."""
    if kind == "memory":
        return "in memory only", "warn"
    if kind != "replicated":
        return ("on disk", "plain") if state in ("local", "unknown") else (state, "plain")
    return {
        "local": ("local only", "warn"),
        "uploading": ("uploading", "busy"),
        "verified": (f"safe in {remote}", "ok"),
        "written, sync pending": ("written, sync pending", "warn"),
        "on remote, unchecked": (f"in {remote}, unchecked", "ok"),
        "remote only": (f"in {remote} only", "ok"),
        "failed": ("upload failed, retrying", "error"),
        "missing": ("missing", "error"),
    }.get(state, (state, "plain"))


def storage_kind(store: Any) -> tuple[str, str]:
    """('replicated' | 'memory' | 'disk', what to call the remote side) of a store."""
    url: str = store.url
    if isinstance(store, Staged):
        drive = store.remote_kind in ("mount", "api") or "drive" in url.lower()
        return "replicated", "Drive" if drive else "remote store"
    return ("memory" if url.startswith("memory://") else "disk"), ""


def writer_status(busy: bool, last_saved: SnapshotInfo | None, last_error: BaseException | None,
                  durable_after: float | None = None, now: float | None = None) -> tuple[str, str]:
    """The background writer in plain words, and its tone."""
    if last_error is not None:
        return (f"the last save failed: {last_error}. Training goes on, earlier snapshots are intact, "
                "and the next save tries again", "error")
    if busy:
        return "writing a snapshot in the background…", "busy"
    if last_saved is None:
        return "idle, nothing saved by this kernel yet", "plain"
    what = f" ({last_saved.label})" if last_saved.label else ""
    took = f", durable after {seconds(durable_after)}" if durable_after else ""
    return f"idle; last snapshot {ago(last_saved.created, now)}{what}{took}", "ok"


# -- ordering, badges, paging ----------------------------------------------------------------------
def grouped(infos: Iterable[SnapshotInfo]) -> list[SnapshotInfo]:
    """Runs in the order of their newest snapshot, each run's snapshots newest first."""
    runs: dict[str, list[SnapshotInfo]] = {}
    for info in sorted(infos, key=lambda s: (s.created, s.id), reverse=True):
        runs.setdefault(info.run, []).append(info)
    return [info for items in runs.values() for info in items]


def first_metric(infos: Sequence[SnapshotInfo]) -> str | None:
    """The first metric, newest snapshot first, whose name says what it measures (``val_loss``,
    ``acc``); never an accumulator such as ``total`` or ``running_loss`` (see ``metric_names``)."""
    return next((name for s in infos for name in s.metrics if metric_names.is_metric(name)), None)


def run_best(infos: Sequence[SnapshotInfo], chosen: str | None = None) -> tuple[str, str, SnapshotInfo] | None:
    """(metric, mode, best snapshot) of one run's snapshots (newest first), by ``chosen`` when the
    run has it, else by its first metric whose name says what it measures; None when there is no
    such metric or fewer than two snapshots have it."""
    spec = parse_metric(chosen)
    if spec is None or not any(spec[0] in s.metrics for s in infos):
        name = first_metric(infos)
        if name is None:
            return None
        spec = (name, metric_mode(name))
    scored = [s for s in infos if isinstance(s.metrics.get(spec[0]), (int, float))
              and math.isfinite(s.metrics[spec[0]])]
    if len(scored) < 2:
        return None
    return spec[0], spec[1], best_of(scored, spec[0], spec[1])[0]


def badges(infos: Sequence[SnapshotInfo], chosen: str | None = None) -> dict[str, tuple[str, ...]]:
    """Badges of every snapshot: latest and best per run, pinned, and the 'final'/'interrupted' tags."""
    by_run: dict[str, list[SnapshotInfo]] = {}
    for info in grouped(infos):
        by_run.setdefault(info.run, []).append(info)
    marks: dict[str, set[str]] = {}
    for items in by_run.values():
        marks.setdefault(items[0].id, set()).add("latest")
        best = run_best(items, chosen)
        if best is not None:
            marks.setdefault(best[2].id, set()).add("best")
    out = {}
    for info in infos:
        found = marks.get(info.id, set()) | {tag for tag in ("final", "interrupted") if tag in info.tags}
        if info.pinned:
            found.add("pinned")
        out[info.id] = tuple(b for b in BADGES if b in found)
    return out


@dataclass(frozen=True)
class Page:
    """One page of a list: ``number`` is 0-based; rows ``start``..``stop`` of ``total``."""

    number: int
    count: int
    start: int
    stop: int
    total: int

    @property
    def text(self) -> str:
        if not self.total:
            return "no snapshots"
        return f"page {self.number + 1} of {self.count} · {self.start + 1}–{self.stop} of {self.total:,}"


def paginate(total: int, number: int, page_size: int) -> Page:
    count = max(1, math.ceil(total / page_size))
    number = min(max(0, number), count - 1)
    start = number * page_size
    return Page(number, count, start, min(total, start + page_size), total)


# -- rows and the table ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One snapshot as the table shows it."""

    number: int  # 1-based position in the whole (filtered) list
    id: str
    run: str
    when: str
    clock: str
    full_clock: str
    position: str
    metrics: tuple[tuple[str, str], ...]
    size: str
    storage: str
    tone: str
    badges: tuple[str, ...]
    note: str = ""
    recent: bool = True  # saved less than a day ago: the relative time is worth showing

    @property
    def label(self) -> str:
        """The row in one line, for a dropdown."""
        metric = f" · {self.metrics[0][0]} {self.metrics[0][1]}" if self.metrics else ""
        where = f" · {self.position}" if self.position else ""
        return f"{self.number}. {self.run} · {self.clock}{where}{metric}"


def make_row(info: SnapshotInfo, number: int, marks: tuple[str, ...], now: float,
             kind: str = "disk", remote: str = "Drive") -> Row:
    storage, tone = storage_label(info.state, kind, remote)
    return Row(
        number=number, id=info.id, run=info.run, when=ago(info.created, now),
        clock=short_clock(info.created, now), full_clock=clock(info.created), position=info.label,
        metrics=tuple((k, number_text(v)) for k, v in info.metrics.items()),
        size=size(info.size), storage=storage, tone=tone, badges=marks, note=info.note or "",
        recent=now - info.created < 86400,
    )


def number_text(value: Any) -> str:
    return number(value) if isinstance(value, (int, float)) else str(value)


def pill(name: str) -> str:
    bg, fg = PILL.get(name, ("#eeeeee", "#333333"))
    return (f'<span class="nbguard-badge" style="display:inline-block;padding:0 6px;margin:1px 2px 1px 0;'
            f'border-radius:8px;font-size:10.5px;line-height:16px;font-weight:600;background:{bg};color:{fg}">'
            f"{esc(name)}</span>")


def dot(tone: str) -> str:
    return (f'<span style="display:inline-block;width:7px;height:7px;border-radius:50%;margin-right:5px;'
            f'vertical-align:1px;background:{TONE.get(tone, TONE["plain"])}"></span>')


def metric_columns(rows: Sequence[Row], limit: int = MAX_METRIC_COLUMNS) -> list[str]:
    names: list[str] = []
    for row in rows:
        for name, _ in row.metrics:
            if name not in names:
                names.append(name)
    return names[:limit]


def table_html(rows: Sequence[Row], *, selected: str | None = None,
               run_notes: Mapping[str, str] | None = None) -> str:
    """The page's rows as an HTML table: runs as group headings, numbers right-aligned."""
    if not rows:
        return (f'<div style="{FONT};padding:14px 4px;{MUTED}">No snapshots here yet. Save one with '
                '<code>guard.save(...)</code> or run a <code>%%checkpointed</code> cell; it shows up here '
                "by itself.</div>")
    names = metric_columns(rows)
    widths = ["30px", "128px", "14%", *(["66px"] * len(names)), "76px", "112px", "auto"]
    th = f"padding:4px 6px;font-weight:600;font-size:11px;{MUTED};{RULE};text-align:left;white-space:nowrap"
    heads = ["#", "saved", "position", *names, "size", "storage", ""]
    right = {3 + i for i in range(len(names))} | {3 + len(names)}
    out = [f'<div class="nbguard-table" style="{FONT};max-width:100%;overflow-x:auto">',
           '<table style="width:100%;table-layout:fixed;border-collapse:collapse;margin:2px 0;font-size:inherit;'
           'color:inherit">',
           "<colgroup>" + "".join(f'<col style="width:{w}">' for w in widths) + "</colgroup><thead><tr>"]
    for i, head in enumerate(heads):
        align = ";text-align:right" if i in right else ""
        out.append(f'<th style="{th}{align}" title="{esc(head)}">{esc(head)}</th>')
    out.append("</tr></thead><tbody>")
    run = None
    for row in rows:
        if row.run != run:
            run = row.run
            note = (run_notes or {}).get(run, "")
            out.append(f'<tr class="nbguard-run"><td colspan="{len(heads)}" style="padding:7px 6px 3px;{RULE};'
                       f'font-weight:600">run {esc(run)} <span style="font-weight:400;{MUTED}">{esc(note)}</span>'
                       "</td></tr>")
        out.append(_row_html(row, names, row.id == selected))
    out.append("</tbody></table></div>")
    return "".join(out)


def _row_html(row: Row, names: Sequence[str], selected: bool) -> str:
    pad = "padding:4px 6px"
    cut = f"{pad};white-space:nowrap;overflow:hidden;text-overflow:ellipsis"
    wrap = f"{pad};overflow-wrap:anywhere"
    num = f"{cut};text-align:right;font-variant-numeric:tabular-nums"
    metrics = dict(row.metrics)
    extra = ", ".join(f"{k} {v}" for k, v in row.metrics if k not in names)
    title = f"{row.id} · {row.full_clock} ({row.when})" + (f" · {row.note}" if row.note else "") \
        + (f" · {extra}" if extra else "")
    style = RULE + (";background:rgba(25,118,210,0.10)" if selected else "")
    mark = "box-shadow:inset 3px 0 0 #1976d2;" if selected else ""
    when = f' <span style="{MUTED}">{esc(row.when)}</span>' if row.recent else ""
    return "".join([
        f'<tr class="nbguard-row{" nbguard-selected" if selected else ""}" data-snapshot="{esc(row.id)}" '
        f'title="{esc(title)}" style="{style}">',
        f'<td style="{num};{mark}{MUTED}">{row.number}</td>',
        f'<td style="{cut}">{esc(row.clock)}{when}</td>',
        f'<td style="{wrap}">{esc(row.position) or "—"}</td>',
        *(f'<td style="{num}">{esc(metrics.get(n, "—"))}</td>' for n in names),
        f'<td style="{num};{MONO}">{esc(row.size)}</td>',
        f'<td style="{wrap}">{dot(row.tone)}{esc(row.storage)}</td>',
        f'<td style="padding:2px 6px">{"".join(pill(b) for b in row.badges)}</td>',
        "</tr>",
    ])


def run_notes(infos: Sequence[SnapshotInfo], chosen: str | None = None) -> dict[str, str]:
    """'· 12 snapshots · best loss 0.0123' per run."""
    by_run: dict[str, list[SnapshotInfo]] = {}
    for info in grouped(infos):
        by_run.setdefault(info.run, []).append(info)
    notes = {}
    for run, items in by_run.items():
        text = f"· {len(items)} snapshot{'s' if len(items) != 1 else ''}"
        best = run_best(items, chosen)
        if best is not None:
            text += f" · best {best[0]} {number(best[2].metrics[best[0]])} ({best[1]})"
        notes[run] = text
    return notes


def header_html(place: str, used: int | None, snapshots: int, runs: int,
                writer: tuple[str, str] | None = None, problems: int = 0) -> str:
    """Where snapshots live, the space they use, and the writer's state."""
    facts = [f"{snapshots:,} snapshot{'s' if snapshots != 1 else ''} in {runs} run{'s' if runs != 1 else ''}"]
    if used is not None:
        facts.append(f"{size(used)} used")
    lines = [f'<div style="font-size:14px;font-weight:600;margin-bottom:2px">nbguard snapshots '
             f'<span style="font-weight:400;{MUTED};font-size:12.5px">· {" · ".join(facts)}</span></div>',
             f'<div><span style="{MUTED}">stored in</span> {esc(place)}</div>']
    if writer is not None:
        lines.append(f'<div><span style="{MUTED}">background writer</span> {dot(writer[1])}{esc(writer[0])}</div>')
    if problems:
        lines.append(f'<div style="color:{TONE["error"]}">{problems} damaged snapshot file'
                     f'{"s are" if problems != 1 else " is"} hidden: check them with <code>nbguard verify</code></div>')
    return f'<div class="nbguard-header" style="{FONT};padding:2px 0 6px">{"".join(lines)}</div>'


def status_html(text: str, tone: str = "plain") -> str:
    if not text:
        return ""
    color = TONE.get(tone, TONE["plain"]) if tone in ("error", "ok", "warn") else "inherit"
    weight = "font-weight:600;" if tone == "error" else ""
    return (f'<div class="nbguard-status" data-tone="{esc(tone)}" style="{FONT};{weight}color:{color};'
            f'padding:2px 0">{esc(text)}</div>')
