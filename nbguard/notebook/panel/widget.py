"""The snapshot panel: core ipywidgets over a Catalog (Colab renders nothing else).

Every button is a one-line trampoline onto a public method of ``Panel``, because ipywidgets'
callback dispatcher swallows exceptions: the methods catch nbguard's errors themselves and show
them in the status line, so the same code path serves clicks, code and tests.

Catalog events arrive on the writer thread. The listener only sets a flag and, if none is pending,
starts a one-shot timer; the timer thread does the refresh, at most once per ``throttle`` seconds
of a burst, so a save never waits for the panel.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import ipywidgets as W

from ...engine.catalog import Catalog, Comparison
from ...engine.guard import Guard
from ...engine.report import RestoreReport
from ...errors import NbguardError, SnapshotError, UsageError
from ...format.manifest import SnapshotInfo
from ...humanize import size
from ...stores import Store, open_store
from . import model
from .chart import chart_svg

USAGE_MAX_AGE = 10.0  # seconds: a live refresh re-sums the store's size at most this often
MAX_COMPARE_CHOICES = 200


def _action(what: str):
    """Run a public action; any failure goes to the status line (and ``last_error``), never up."""
    def wrap(method):
        @functools.wraps(method)
        def run(self: Panel, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except NbguardError as exc:
                self._fail(f"Could not {what}: {exc}", exc)
            except OSError as exc:
                self._fail(f"Could not {what}: {exc}", exc)
            except Exception as exc:  # a bug: still say it where the user looks
                self._fail(f"Could not {what}: unexpected {type(exc).__name__}: {exc} "
                           "(this is a bug in nbguard; please report it)", exc)
            return None
        return run
    return wrap


class Panel:
    """Snapshots of a store as a table, a chart and actions (restore, pin, delete, export, compare).

    Display it as a cell's value; drive it from code with the same methods its buttons call.
    """

    def __init__(
        self,
        catalog: Catalog,
        *,
        run: str | None = None,
        namespace: MutableMapping[str, Any] | None = None,
        guard: Guard | None = None,
        on_restore: Callable[[SnapshotInfo], Any] | None = None,
        page_size: int = 20,
        place_text: str | None = None,
        best_metric: str | None = None,
        throttle: float = 1.0,
    ):
        if type(page_size) is not int or page_size < 1:
            raise UsageError(f"page_size must be a whole number of at least 1, not {page_size!r}")
        self.catalog = catalog
        self.run = run
        self.namespace = namespace
        self.guard = guard
        self.on_restore = on_restore
        self.page_size = page_size
        self.place_text = place_text or _default_place(catalog.store)
        self.best_metric = best_metric
        self.throttle = throttle
        self.snapshots: list[SnapshotInfo] = []  # grouped by run, newest first
        self.rows: list[model.Row] = []  # the page on screen
        self.page = model.paginate(0, 0, page_size)
        self.selected: str | None = None
        self.status_text = ""
        self.status_tone = "plain"
        self.last_error: BaseException | None = None
        self._by_id: dict[str, int] = {}
        self._badges: dict[str, tuple[str, ...]] = {}
        self._notes: dict[str, str] = {}
        self._runs: list[str] = []
        self._usage: int | None = None
        self._usage_at = -1e9
        self._pending: tuple[str, str] | None = None
        self._kind, self._remote = _storage_kind(catalog.store)
        self._lock = threading.RLock()  # panel state and widgets: the UI thread vs the refresh timer
        self._wake = threading.Condition()  # the timer handshake, never held for long
        self._dirty = False
        self._timer: threading.Timer | None = None
        self._ticking = False
        self._closed = False
        self._quiet = False  # set while the panel itself changes dropdowns
        self._watched: set[int] = set()
        self._unsubscribe: list[Callable[[], Any]] = []
        self._build()
        self._watch(catalog)
        if guard is not None:
            self._watch(guard.catalog)
        self.refresh()

    def __repr__(self) -> str:
        return f"<nbguard Panel: {len(self.snapshots)} snapshots in {self.catalog.store.url}>"

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # -- widgets ---------------------------------------------------------------------------------
    def _build(self) -> None:
        def button(text: str, tip: str, css: str, style: str = "") -> W.Button:
            b = W.Button(description=text, tooltip=tip, button_style=style, layout=W.Layout(width="auto", flex="0 0 auto"))
            b.add_class(css)
            return b

        wide = {"description_width": "initial"}
        self.header = W.HTML(layout=W.Layout(width="100%", margin="0"))
        self.table = W.HTML(layout=W.Layout(width="100%", margin="0"))
        self.prev_button = button("‹ Prev", "newer snapshots", "nbguard-prev")
        self.next_button = button("Next ›", "older snapshots", "nbguard-next")
        self.page_label = W.Label()
        self.run_pick = W.Dropdown(description="run", options=[("all runs", "")], style=wide,
                                   layout=W.Layout(width="240px"))
        self.pick = W.Dropdown(description="snapshot", style=wide, layout=W.Layout(flex="1 1 auto", width="auto",
                                                                                   min_width="220px"))
        self.pick.add_class("nbguard-pick")
        self.restore_button = button("Restore", "load this snapshot into the kernel (asks first)", "nbguard-restore",
                                     "primary")
        self.pin_button = button("Pin", "pinned snapshots survive cleanup", "nbguard-pin")
        self.export_button = button("Export…", "write one module's weights to a .safetensors file", "nbguard-export")
        self.compare_button = button("Compare…", "metrics and tensor changes against another snapshot",
                                     "nbguard-compare")
        self.delete_button = button("Delete", "delete this snapshot (asks first)", "nbguard-delete")
        self.refresh_button = button("Refresh", "read the store again", "nbguard-refresh")
        self.confirm_text = W.HTML(layout=W.Layout(width="100%", margin="0"))
        self.confirm_button = button("Confirm", "", "nbguard-confirm", "warning")
        self.cancel_button = button("Cancel", "change nothing", "nbguard-cancel")
        self.export_module = W.Dropdown(description="module", style=wide, layout=W.Layout(width="220px"))
        self.export_path = W.Text(description="file", style=wide, layout=W.Layout(flex="1 1 auto", width="auto"))
        self.export_go = button("Write .safetensors", "", "nbguard-export-go", "primary")
        self.compare_with = W.Dropdown(description="compare with", style=wide,
                                       layout=W.Layout(flex="1 1 auto", width="auto"))
        self.compare_go = button("Compare", "", "nbguard-compare-go", "primary")
        self.progress = W.IntProgress(min=0, max=100, description="restoring", style=wide,
                                      layout=W.Layout(width="100%", margin="0", display="none"))
        self.status = W.HTML(layout=W.Layout(width="100%", margin="0"))
        self.result = W.HTML(layout=W.Layout(width="100%", margin="0"))
        self.chart = W.HTML(layout=W.Layout(width="100%", margin="0"))
        box = {"padding": "6px 10px", "margin": "4px 0", "border": "1px solid #d0d7de", "display": "none"}
        self.confirm_box = W.VBox([self.confirm_text, W.HBox([self.confirm_button, self.cancel_button])],
                                  layout=W.Layout(**box))
        self.export_box = W.HBox([self.export_module, self.export_path, self.export_go], layout=W.Layout(**box))
        self.compare_box = W.HBox([self.compare_with, self.compare_go], layout=W.Layout(**box))
        nav = W.HBox([W.HBox([self.prev_button, self.page_label, self.next_button]), self.run_pick],
                     layout=W.Layout(justify_content="space-between", align_items="center", width="100%", margin="0"))
        actions = W.HBox([self.pick, self.restore_button, self.pin_button, self.export_button, self.compare_button,
                          self.delete_button, self.refresh_button], layout=W.Layout(width="100%", align_items="center", margin="0"))
        self.widget = W.VBox([self.header, self.table, nav, actions, self.confirm_box, self.export_box,
                              self.compare_box, self.progress, self.status, self.result, self.chart],
                             layout=W.Layout(width="100%", max_width="1100px", padding="6px 10px",
                                             border="1px solid #e0e0e0"))
        self.widget.add_class("nbguard-panel")
        self._boxes = (self.confirm_box, self.export_box, self.compare_box)

        self.prev_button.on_click(lambda _: self.prev_page())
        self.next_button.on_click(lambda _: self.next_page())
        self.run_pick.observe(lambda change: self._quiet or self.show_run(change["new"] or None), names="value")
        self.pick.observe(lambda change: self._quiet or self.select(change["new"]), names="value")
        self.restore_button.on_click(lambda _: self.restore())
        self.pin_button.on_click(lambda _: self.toggle_pin())
        self.export_button.on_click(lambda _: self.show_export())
        self.compare_button.on_click(lambda _: self.show_compare())
        self.delete_button.on_click(lambda _: self.delete())
        self.refresh_button.on_click(lambda _: self.refresh())
        self.confirm_button.on_click(lambda _: self.confirm())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.export_go.on_click(lambda _: self.export())
        self.compare_go.on_click(lambda _: self.compare())

    def _render(self) -> None:
        now = time.time()
        total = len(self.snapshots)
        if self.selected in self._by_id:
            self.page = model.paginate(total, self._by_id[self.selected] // self.page_size, self.page_size)
        else:
            self.page = model.paginate(total, self.page.number, self.page_size)
            self.selected = self.snapshots[self.page.start].id if total else None
        items = self.snapshots[self.page.start:self.page.stop]
        self.rows = [model.make_row(s, self.page.start + i + 1, self._badges.get(s.id, ()), now, self._kind,
                                    self._remote) for i, s in enumerate(items)]
        self.header.value = model.header_html(self.place_text, self._usage, total, len({s.run for s in self.snapshots}),
                                              self._writer(now), len(self.catalog.problems))
        self.table.value = model.table_html(self.rows, selected=self.selected, run_notes=self._notes)
        self.page_label.value = self.page.text
        self.prev_button.disabled = self.page.number == 0
        self.next_button.disabled = self.page.number >= self.page.count - 1
        info = self.snapshots[self._by_id[self.selected]] if self.selected else None
        for b in (self.restore_button, self.pin_button, self.export_button, self.compare_button, self.delete_button):
            b.disabled = info is None
        self.pin_button.description = "Unpin" if info is not None and info.pinned else "Pin"
        self._quietly(self.pick, [(r.label, r.id) for r in self.rows], self.selected)
        self._quietly(self.run_pick, [("all runs", ""), *((r, r) for r in self._runs)], self.run or "")
        run = info.run if info else self.run
        if run is None:
            self.chart.value = ""
        else:
            of_run = [s for s in self.snapshots if s.run == run]
            best = model.run_best(of_run, self.best_metric)
            self.chart.value = chart_svg(of_run, selected=self.selected, best=best[2].id if best else None,
                                         title=f"Metrics of run {run} over time, one point per snapshot:")

    def _quietly(self, dropdown: W.Dropdown, options: list[tuple[str, str]], value: str | None) -> None:
        self._quiet = True
        try:
            if list(dropdown.options) != options:
                dropdown.options = options
            if dropdown.value != value and any(v == value for _, v in options):
                dropdown.value = value
        finally:
            self._quiet = False

    def _writer(self, now: float) -> tuple[str, str] | None:
        if self.guard is None:
            return None
        stats = self.guard.last_stats
        return model.writer_status(self.guard.busy, self.guard.last_saved, self.guard.last_error,
                                   stats.durable_after if stats else None, now)

    def _say(self, text: str, tone: str = "plain") -> None:
        self.status_text, self.status_tone = text, tone
        self.status.value = model.status_html(text, tone)

    def _fail(self, text: str, exc: BaseException) -> None:
        self.last_error = exc
        self.progress.layout.display = "none"
        self._say(text, "error")

    def _show(self, box: W.Box | None) -> None:
        for b in self._boxes:
            b.layout.display = "flex" if b is box else "none"
        if box is not self.confirm_box:
            self._pending = None

    # -- reading ----------------------------------------------------------------------------------
    @_action("read the snapshots")
    def refresh(self) -> None:
        """Read the store again (and pick up Guards in the namespace that write to it)."""
        self._watch_namespace_guards()
        self._reload(usage=True)

    def _reload(self, usage: bool = False) -> None:
        with self._lock:
            self._dirty = False
            infos = self.catalog.snapshots(self.run)
            self.snapshots = model.grouped(infos)
            self._by_id = {s.id: i for i, s in enumerate(self.snapshots)}
            self._badges = model.badges(infos, self.best_metric)
            self._notes = model.run_notes(infos, self.best_metric)
            self._runs = self.catalog.runs()
            if usage or time.monotonic() - self._usage_at > USAGE_MAX_AGE:
                self._usage, self._usage_at = self.catalog.usage(), time.monotonic()
            self._render()

    def _info(self, snapshot_id: str | None) -> SnapshotInfo:
        snapshot_id = snapshot_id or self.selected
        if not snapshot_id:
            raise UsageError("no snapshot is selected: pick one in the list first")
        if snapshot_id not in self._by_id:
            found = self.catalog.find(snapshot_id, self.run)  # a prefix, 'latest', 'best', or one just saved
            if found.id not in self._by_id:
                self._reload()
            if found.id not in self._by_id:
                raise SnapshotError(f"snapshot {found.id} is not in this panel's list")
            snapshot_id = found.id
        return self.snapshots[self._by_id[snapshot_id]]

    @_action("select the snapshot")
    def select(self, snapshot_id: str | None) -> SnapshotInfo | None:
        """Make a snapshot (id, unique prefix, 'latest' or 'best:METRIC') the one the actions act on."""
        if snapshot_id is None:
            return None
        with self._lock:
            info = self._info(snapshot_id)
            if info.id != self.selected:
                self._show(None)
            self.selected = info.id
            self._render()
            return info

    def show_page(self, number: int) -> model.Page:
        """Show page ``number`` (0-based, clamped) and select its first row."""
        with self._lock:
            self.page = model.paginate(len(self.snapshots), number, self.page_size)
            self.selected = None
            self._render()
            return self.page

    def next_page(self) -> model.Page:
        return self.show_page(self.page.number + 1)

    def prev_page(self) -> model.Page:
        return self.show_page(self.page.number - 1)

    @_action("show the run")
    def show_run(self, run: str | None) -> None:
        """Show one run only (None: every run)."""
        with self._lock:
            self.run, self.selected = run or None, None
            self.page = model.paginate(0, 0, self.page_size)
            self._reload()

    @_action("rank the snapshots")
    def set_best_metric(self, metric: str | None) -> None:
        """Which metric the 'best' badge follows ('val_loss', 'acc:max'); None: each run's first one."""
        with self._lock:
            self.best_metric = metric
            self._reload()

    # -- restoring ----------------------------------------------------------------------------------
    @_action("restore the snapshot")
    def restore(self, snapshot_id: str | None = None, confirm: bool = False) -> RestoreReport | model.RestorePlan | None:
        """Without ``confirm``: show what would be overwritten, with Confirm/Cancel, and return the plan.
        With it: restore into the namespace, report, and call ``on_restore``; returns the report."""
        with self._lock:
            info = self.select(snapshot_id) if snapshot_id else self._info(None)
            if info is None:
                return None
            namespace = self._require_namespace()
            snapshot = self.catalog.get(info.id, info.run)
            if not confirm:
                plan = model.plan_restore(info, snapshot.manifest, namespace)
                self._ask("restore", info.id, model.plan_html(plan), "Confirm restore", "warning")
                return plan
            self._show(None)
            self._say(f"Restoring snapshot {info.id}…", "busy")
            self.progress.value, self.progress.layout.display = 0, "flex"
            try:
                report = snapshot.restore(namespace=namespace, progress=self._progress)
            finally:
                self.progress.layout.display = "none"
            self.result.value = model.report_html(report, snapshot.manifest["objects"])
            where = f" ({info.label})" if info.label else ""
            if report.missing:
                self._say(f"Restored snapshot {info.id}{where}, except {', '.join(report.missing)}: not defined in "
                          "the kernel yet (see below).", "warn")
            else:
                self._say(f"Restored snapshot {info.id}{where}.", "ok")
        if self.on_restore is not None:
            try:
                self.on_restore(info)
            except Exception as exc:
                self._fail(f"Restored snapshot {info.id}, but on_restore failed: {type(exc).__name__}: {exc}", exc)
        return report

    def _progress(self, done: int, total: int) -> None:
        value = 100 if not total else int(100 * done / total)
        if value != self.progress.value:
            self.progress.value = value

    def _require_namespace(self) -> MutableMapping[str, Any]:
        if self.namespace is None:
            raise UsageError("this panel has no namespace to restore into: open it with "
                             "nbguard.panel(..., namespace=globals())")
        return self.namespace

    def _ask(self, action: str, snapshot_id: str, text: str, label: str, style: str) -> None:
        self.confirm_text.value = text
        self.confirm_button.description, self.confirm_button.button_style = label, style
        self._show(self.confirm_box)
        self._pending = (action, snapshot_id)
        self._say("Waiting for you to confirm or cancel; nothing has changed yet.", "plain")

    def confirm(self) -> Any:
        """Carry out the restore or delete that is waiting for confirmation."""
        pending, self._pending = self._pending, None
        if pending is None:
            self._say("Nothing is waiting for confirmation.", "plain")
            return None
        action, snapshot_id = pending
        if action == "restore":
            return self.restore(snapshot_id, confirm=True)
        return self.delete(snapshot_id, confirm=True)

    def cancel(self) -> None:
        """Drop the pending confirmation or the open export/compare form."""
        self._show(None)
        self._say("Cancelled: nothing was changed.", "plain")

    # -- changing ---------------------------------------------------------------------------------------
    @_action("pin the snapshot")
    def pin(self, snapshot_id: str | None = None) -> SnapshotInfo:
        """Pinned snapshots survive retention."""
        with self._lock:
            info = self._info(snapshot_id)
            info = self.catalog.pin(info.id, info.run)
            self._reload()
            self._say(f"Pinned snapshot {info.id}: cleanup keeps it until you unpin it.", "ok")
            return info

    @_action("unpin the snapshot")
    def unpin(self, snapshot_id: str | None = None) -> SnapshotInfo:
        with self._lock:
            info = self._info(snapshot_id)
            info = self.catalog.unpin(info.id, info.run)
            self._reload()
            self._say(f"Unpinned snapshot {info.id}: cleanup may delete it once it is old enough.", "ok")
            return info

    def toggle_pin(self, snapshot_id: str | None = None) -> SnapshotInfo | None:
        """Pin, or unpin when it is pinned (the Pin/Unpin button)."""
        info = self.select(snapshot_id) if snapshot_id else self._selected_info()
        if info is None:
            return None
        return self.unpin(info.id) if info.pinned else self.pin(info.id)

    def _selected_info(self) -> SnapshotInfo | None:
        if self.selected is None:
            self._say("No snapshot is selected: pick one in the list first.", "error")
            return None
        return self.snapshots[self._by_id[self.selected]]

    @_action("delete the snapshot")
    def delete(self, snapshot_id: str | None = None, confirm: bool = False) -> SnapshotInfo | None:
        """Without ``confirm``: ask. With it: delete (manifest first, then unused tensor files)."""
        with self._lock:
            info = self._info(snapshot_id)
            if not confirm:
                self.selected = info.id
                self._render()
                self._ask("delete", info.id, model.delete_html(info, self.catalog.store.url), "Delete it", "danger")
                return None
            self._show(None)
            index = self._by_id[info.id]
            neighbors = self.snapshots[index + 1:index + 2] or self.snapshots[max(0, index - 1):index]
            self.catalog.delete(info.id, info.run)
            if self.selected == info.id:
                self.selected = neighbors[0].id if neighbors else None
            self._reload(usage=True)
            self._say(f"Deleted snapshot {info.id}.", "ok")
            return info

    # -- exporting and comparing -------------------------------------------------------------------------
    @_action("prepare the export")
    def show_export(self, snapshot_id: str | None = None) -> list[str]:
        """Open the export form for a snapshot; returns the module names it offers."""
        with self._lock:
            info = self._info(snapshot_id)
            names = model.module_names(self.catalog.get(info.id, info.run).manifest["objects"])
            if not names:
                raise UsageError(f"snapshot {info.id} holds no module or other object with a state_dict")
            self._quietly(self.export_module, [(n, n) for n in names], names[0])
            self.export_path.value = _default_export_path(info, names[0])
            self._show(self.export_box)
            self._say("Pick a module and a file name, then Write .safetensors.", "plain")
            return names

    @_action("export the weights")
    def export(self, snapshot_id: str | None = None, module: str | None = None, path: str | None = None) -> str:
        """Write one module's weights from a snapshot to a ``.safetensors`` file; returns its path."""
        with self._lock:
            info = self._info(snapshot_id)
            if module is None:
                module = self.export_module.value or model.module_names(
                    self.catalog.get(info.id, info.run).manifest["objects"])[0]
            path = os.path.expanduser(path or self.export_path.value.strip() or _default_export_path(info, module))
            written = self.catalog.export(info.id, module, path, run=info.run)
            self._show(None)
            self.result.value = (f'<div style="{model.FONT}">Weights of <code>{model.esc(module)}</code> from snapshot '
                                 f"{model.esc(info.id)}: <code>{model.esc(written)}</code></div>")
            self._say(f"Wrote the weights of {module} to {written} ({size(os.path.getsize(written))}).", "ok")
            return written

    @_action("prepare the comparison")
    def show_compare(self, snapshot_id: str | None = None) -> list[str]:
        """Open the compare form: pick the other snapshot (default: the previous one of the same run)."""
        with self._lock:
            info = self._info(snapshot_id)
            others = [s for s in self.snapshots if s.id != info.id]
            others = ([s for s in others if s.run == info.run] + [s for s in others if s.run != info.run])
            others = others[:MAX_COMPARE_CHOICES]
            if not others:
                raise UsageError("there is no other snapshot to compare with")
            now = time.time()
            options = [(model.make_row(s, self._by_id[s.id] + 1, (), now).label, s.id) for s in others]
            self._quietly(self.compare_with, options, self._previous(info) or others[0].id)
            self._show(self.compare_box)
            self._say("Pick the snapshot to compare with, then Compare.", "plain")
            return [s.id for s in others]

    def _previous(self, info: SnapshotInfo) -> str | None:
        older = [s for s in self.snapshots[self._by_id[info.id] + 1:] if s.run == info.run]
        return older[0].id if older else None

    @_action("compare the snapshots")
    def compare(self, id_a: str | None = None, id_b: str | None = None) -> Comparison:
        """Metrics side by side and the tensors that changed most. Without ids: the form's choice
        against the selected snapshot, older one first."""
        with self._lock:
            if id_a is not None and id_b is not None:
                a, b = self._info(id_a), self._info(id_b)
            else:
                a = self._info(id_a)
                other = id_b or self.compare_with.value or self._previous(a)
                if other is None:
                    raise UsageError("there is no other snapshot to compare with")
                b = self._info(other)
                if b.created < a.created:
                    a, b = b, a
            comparison = self.catalog.compare(a.id, b.id)
            self._show(None)
            self.result.value = model.comparison_html(comparison)
            self._say(f"Compared {a.id} with {b.id}: {len(comparison.changed)} tensors changed.", "ok")
            return comparison

    # -- live updates -------------------------------------------------------------------------------------
    def _watch(self, catalog: Catalog) -> None:
        if id(catalog) in self._watched:
            return
        self._watched.add(id(catalog))
        self._unsubscribe.append(catalog.subscribe(self._on_event))
        on_change = getattr(catalog.store, "on_change", None)  # a replicated store's upload states
        if callable(on_change):
            self._unsubscribe.append(on_change(self._on_event))

    def _watch_namespace_guards(self) -> None:
        """A Guard in the namespace writing to the same store tells its own Catalog about saves:
        listen there too, or a panel opened by path would never see them."""
        if self.namespace is None:
            return
        try:
            values = list(self.namespace.values())
        except RuntimeError:  # changed while we looked; the next refresh looks again
            return
        for value in values:
            if isinstance(value, Guard) and value.store.url == self.catalog.store.url:
                self._watch(value.catalog)

    def _on_event(self, *_: Any) -> None:
        """Called on the writer's or uploader's thread: set a flag and arm the timer, nothing else."""
        self._dirty = True
        if self._timer is None and not self._closed:
            with self._wake:
                if self._timer is None:
                    self._timer = threading.Timer(self.throttle, self._tick)
                    self._timer.daemon = True
                    self._timer.start()

    def _tick(self) -> None:
        with self._wake:
            self._timer, self._ticking = None, True
        try:
            self.process_pending()
        finally:
            with self._wake:
                self._ticking = False
                self._wake.notify_all()

    def process_pending(self) -> bool:
        """Apply pending store events now (what the timer does); True if there were any."""
        if not self._dirty or self._closed:
            return False
        self._live_reload()
        return True

    @_action("update the list")
    def _live_reload(self) -> None:
        self._reload(usage=False)

    def wait_for_refresh(self, timeout: float = 5.0) -> bool:
        """Wait until every store event so far is shown; False on timeout (for tests and scripts)."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._dirty or self._timer is not None or self._ticking:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wake.wait(remaining)
        return True

    def close(self) -> None:
        """Stop listening to the store and close the widgets."""
        self._closed = True
        with self._wake:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        _close_tree(self.widget)


def _close_tree(widget: W.Widget) -> None:
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    widget.close()


def _default_place(store: Store) -> str:
    if store.url.startswith("memory://"):
        return f"{store.url} (this kernel's memory: gone when the kernel stops)"
    return store.url


def _storage_kind(store: Store) -> tuple[str, str]:
    return model.storage_kind(store)


def _default_export_path(info: SnapshotInfo, module: str) -> str:
    return f"{info.run}-{module}-{info.id}.safetensors"


def _kernel_namespace() -> MutableMapping[str, Any] | None:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return shell.user_ns if shell is not None else None


def _catalog_for(location: Catalog | Store | str | os.PathLike[str] | None, guard: Guard | None) -> Catalog:
    if isinstance(location, Catalog):
        return location
    if location is None:
        return guard.catalog if guard is not None else Catalog()  # this notebook's default folder
    store = open_store(location)
    if guard is not None and store.url == guard.store.url:
        return guard.catalog  # the Guard's own catalog hears its saves
    return Catalog(store)


def open_panel(
    location: Catalog | Store | str | os.PathLike[str] | None = None,
    *,
    run: str | None = None,
    namespace: MutableMapping[str, Any] | None = None,
    guard: Guard | None = None,
    on_restore: Callable[[SnapshotInfo], Any] | None = None,
    page_size: int = 20,
    place_text: str | None = None,
    best_metric: str | None = None,
) -> Panel:
    """The snapshot panel over a store (a folder, a URL, a Store or a Catalog; default: the
    ``guard``'s store, else this notebook's default folder). ``namespace`` (default: the IPython user namespace)
    is what Restore loads into; ``on_restore(info)`` is called after each successful restore."""
    return Panel(_catalog_for(location, guard), run=run,
                 namespace=namespace if namespace is not None else _kernel_namespace(), guard=guard,
                 on_restore=on_restore, page_size=page_size, place_text=place_text, best_metric=best_metric)
