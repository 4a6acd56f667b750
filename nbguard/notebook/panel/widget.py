"""The snapshot panel's view: core ipywidgets over a ``PanelController`` (Colab renders nothing else).

The view holds no state of its own: it builds the widgets, maps the controller's state onto their
traits when the controller says a part changed, and forwards clicks to the controller's actions.
Every button is a one-line trampoline onto a public method, so clicks, code and tests take the same path.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import ipywidgets as W

from . import model
from .controller import PARTS, PanelController, WriterSource

if TYPE_CHECKING:  # annotations only: at run time the view reaches the store through the controller
    from ...engine.catalog import Catalog, Comparison
    from ...engine.report import RestoreReport
    from ...format.manifest import SnapshotInfo
    from .action_text import RestorePlan


class _Shared:
    """An attribute of the panel that lives on its controller (read and written there)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, panel: Panel | None, owner: type | None = None) -> Any:
        return self if panel is None else getattr(panel.controller, self.name)

    def __set__(self, panel: Panel, value: Any) -> None:
        setattr(panel.controller, self.name, value)


class Panel:
    """Snapshots of a store as a table, a chart and actions (restore, pin, delete, export, compare).

    Display it as a cell's value; drive it from code with the same methods its buttons call.
    """

    catalog = _Shared()
    run = _Shared()
    namespace = _Shared()
    guard = _Shared()
    on_restore = _Shared()
    page_size = _Shared()
    place_text = _Shared()
    best_metric = _Shared()
    throttle = _Shared()
    snapshots = _Shared()  # grouped by run, newest first
    rows = _Shared()  # the page on screen
    page = _Shared()
    selected = _Shared()
    status_text = _Shared()
    status_tone = _Shared()
    last_error = _Shared()

    def __init__(
        self,
        catalog: Catalog,
        *,
        run: str | None = None,
        namespace: MutableMapping[str, Any] | None = None,
        guard: WriterSource | None = None,
        on_restore: Callable[[SnapshotInfo], Any] | None = None,
        page_size: int = 20,
        place_text: str | None = None,
        best_metric: str | None = None,
        throttle: float = 1.0,
    ):
        self.controller = PanelController(catalog, run=run, namespace=namespace, guard=guard, on_restore=on_restore,
                                          page_size=page_size, place_text=place_text, best_metric=best_metric,
                                          throttle=throttle)
        self._quiet = False  # set while the view itself changes dropdowns
        self._build()
        self.controller.on_change = self._show
        for part in PARTS:
            self._show(part)

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
        self.run_pick.observe(self._run_picked, names="value")
        self.pick.observe(self._snapshot_picked, names="value")
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
        self.export_module.observe(self._copy_to_controller("export_module"), names="value")
        self.export_path.observe(self._copy_to_controller("export_path"), names="value")
        self.compare_with.observe(self._copy_to_controller("compare_with"), names="value")

    # -- the controller's state onto traits --------------------------------------------------------
    def _show(self, part: str) -> None:
        """Map one changed part of the controller (one of ``PARTS``) onto the widgets."""
        c = self.controller
        if part == "list":
            self.header.value = c.header_html()
            self.table.value = c.table_html()
            self.page_label.value = c.page.text
            self.prev_button.disabled = c.page.number == 0
            self.next_button.disabled = c.page.number >= c.page.count - 1
            info = c.selected_info()
            for b in (self.restore_button, self.pin_button, self.export_button, self.compare_button,
                      self.delete_button):
                b.disabled = info is None
            self.pin_button.description = "Unpin" if info is not None and info.pinned else "Pin"
            self._quietly(self.pick, [(r.label, r.id) for r in c.rows], c.selected)
            self._quietly(self.run_pick, [("all runs", ""), *((r, r) for r in c.runs)], c.run or "")
            self.chart.value = c.chart_html()
        elif part == "form":
            for form, box in zip(("confirm", "export", "compare"), self._boxes, strict=True):
                box.layout.display = "flex" if c.form == form else "none"
            if c.question is not None:
                self.confirm_text.value = c.question.html
                self.confirm_button.description = c.question.label
                self.confirm_button.button_style = c.question.style
            self._quietly(self.export_module, [(n, n) for n in c.export_modules], c.export_module)
            self._quietly(self.export_path, None, c.export_path)
            self._quietly(self.compare_with, c.compare_choices, c.compare_with)
        elif part == "status":
            self.status.value = c.status_html()
        elif part == "result":
            self.result.value = c.result_html
        elif part == "progress":
            if c.progress is not None:
                self.progress.value = c.progress
            self.progress.layout.display = "none" if c.progress is None else "flex"

    def _quietly(self, widget: W.ValueWidget, options: list[tuple[str, str]] | None, value: str | None) -> None:
        """Set a dropdown's options (or a text's value) without calling its observers back."""
        self._quiet = True
        try:
            if options is None:
                if widget.value != value:
                    widget.value = value
                return
            if list(widget.options) != options:
                widget.options = options
            if widget.value != value and any(v == value for _, v in options):
                widget.value = value
        finally:
            self._quiet = False

    def _run_picked(self, change: dict[str, Any]) -> None:
        if not self._quiet:
            self.show_run(change["new"] or None)

    def _snapshot_picked(self, change: dict[str, Any]) -> None:
        if not self._quiet:
            self.select(change["new"])

    def _copy_to_controller(self, name: str) -> Callable[[dict[str, Any]], None]:
        """An observer that copies a form field's value the user changed onto the controller."""
        def observe(change: dict[str, Any]) -> None:
            if not self._quiet:
                setattr(self.controller, name, change["new"])
        return observe

    # -- actions: the controller's, shown by _show ------------------------------------------------------
    def refresh(self) -> None:
        """Read the store again."""
        self.controller.refresh()

    def select(self, snapshot_id: str | None) -> SnapshotInfo | None:
        """Make a snapshot (id, unique prefix, 'latest' or 'best:METRIC') the one the actions act on."""
        return self.controller.select(snapshot_id)

    def show_page(self, number: int) -> model.Page:
        """Show page ``number`` (0-based, clamped) and select its first row."""
        return self.controller.show_page(number)

    def next_page(self) -> model.Page:
        return self.controller.next_page()

    def prev_page(self) -> model.Page:
        return self.controller.prev_page()

    def show_run(self, run: str | None) -> None:
        """Show one run only (None: every run)."""
        self.controller.show_run(run)

    def set_best_metric(self, metric: str | None) -> None:
        """Which metric the 'best' badge follows ('val_loss', 'acc:max'); None: each run's first one."""
        self.controller.set_best_metric(metric)

    def restore(self, snapshot_id: str | None = None, confirm: bool = False) -> RestoreReport | RestorePlan | None:
        """Without ``confirm``: show what would be overwritten, with Confirm/Cancel, and return the plan.
        With it: restore into the namespace, report, and call ``on_restore``; returns the report."""
        return self.controller.restore(snapshot_id, confirm)

    def confirm(self) -> Any:
        """Carry out the restore or delete that is waiting for confirmation."""
        return self.controller.confirm()

    def cancel(self) -> None:
        """Drop the pending confirmation or the open export/compare form."""
        self.controller.cancel()

    def pin(self, snapshot_id: str | None = None) -> SnapshotInfo | None:
        """Pinned snapshots survive retention."""
        return self.controller.pin(snapshot_id)

    def unpin(self, snapshot_id: str | None = None) -> SnapshotInfo | None:
        return self.controller.unpin(snapshot_id)

    def toggle_pin(self, snapshot_id: str | None = None) -> SnapshotInfo | None:
        """Pin, or unpin when it is pinned (the Pin/Unpin button)."""
        return self.controller.toggle_pin(snapshot_id)

    def delete(self, snapshot_id: str | None = None, confirm: bool = False) -> SnapshotInfo | None:
        """Without ``confirm``: ask. With it: delete (manifest first, then unused tensor files)."""
        return self.controller.delete(snapshot_id, confirm)

    def show_export(self, snapshot_id: str | None = None) -> list[str] | None:
        """Open the export form for a snapshot; returns the module names it offers."""
        return self.controller.show_export(snapshot_id)

    def export(self, snapshot_id: str | None = None, module: str | None = None, path: str | None = None) -> str | None:
        """Write one module's weights from a snapshot to a ``.safetensors`` file; returns its path."""
        return self.controller.export(snapshot_id, module, path)

    def show_compare(self, snapshot_id: str | None = None) -> list[str] | None:
        """Open the compare form: pick the other snapshot (default: the previous one of the same run)."""
        return self.controller.show_compare(snapshot_id)

    def compare(self, id_a: str | None = None, id_b: str | None = None) -> Comparison | None:
        """Metrics side by side and the tensors that changed most. Without ids: the form's choice
        against the selected snapshot, older one first."""
        return self.controller.compare(id_a, id_b)

    def process_pending(self) -> bool:
        """Apply pending store events now (what the timer does); True if there were any."""
        return self.controller.process_pending()

    def wait_for_refresh(self, timeout: float = 5.0) -> bool:
        """Wait until every store event so far is shown; False on timeout (for tests and scripts)."""
        return self.controller.wait_for_refresh(timeout)

    def close(self) -> None:
        """Stop listening to the store and close the widgets."""
        self.controller.close()
        _close_tree(self.widget)


def _close_tree(widget: W.Widget) -> None:
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    widget.close()
