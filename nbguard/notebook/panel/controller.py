"""The panel's actions, without widgets (the UI-free half of tqdm's std/notebook split).

``PanelController`` is a ``Listing`` (what the list shows) plus what the buttons do: restore into a
namespace, pin, delete, export and compare through a ``Catalog``, with the open form and the status
line as state. Each public action catches nbguard's errors itself and shows them in the status line,
because ipywidgets' callback dispatcher swallows exceptions; so the same code path serves clicks,
code and tests. Store events refresh the list through ``live.StoreEvents``.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from ...engine.catalog import Catalog, Comparison
from ...errors import NbguardError, UsageError
from ...format.manifest import SnapshotInfo
from ...humanize import size
from . import action_text, model
from .listing import PARTS, Listing, WriterSource
from .live import StoreEvents

if TYPE_CHECKING:
    from ...engine.report import RestoreReport
    from ...engine.snapshot import Snapshot

__all__ = ["PARTS", "PanelController", "Question", "WriterSource"]

MAX_COMPARE_CHOICES = 200
FORMS = ("confirm", "export", "compare")

Params = ParamSpec("Params")
Returned = TypeVar("Returned")


@dataclass(frozen=True)
class Question:
    """A restore or delete waiting for Confirm: its words, and the Confirm button's label and style."""

    action: str  # 'restore' or 'delete'
    snapshot_id: str
    html: str
    label: str
    style: str


Method = Callable[Concatenate["PanelController", Params], Returned]


def _action(what: str) -> Callable[[Method[Params, Returned]], Method[Params, Returned | None]]:
    """Run a public action; any failure goes to the status line (and ``last_error``), never up."""
    def wrap(method: Method[Params, Returned]) -> Method[Params, Returned | None]:
        @functools.wraps(method)
        def run(self: PanelController, *args: Params.args, **kwargs: Params.kwargs) -> Returned | None:
            try:
                return method(self, *args, **kwargs)
            except (NbguardError, OSError) as exc:
                self.fail(f"Could not {what}: {exc}", exc)
            except Exception as exc:  # a bug: still say it where the user looks
                self.fail(f"Could not {what}: unexpected {type(exc).__name__}: {exc} "
                          "(this is a bug in nbguard; please report it)", exc)
            return None
        return run
    return wrap


class PanelController(Listing):
    """Snapshots of a store and the actions on them (restore, pin, delete, export, compare)."""

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
        super().__init__(catalog, run=run, guard=guard, page_size=page_size, place_text=place_text,
                         best_metric=best_metric)
        self.namespace = namespace
        self.on_restore = on_restore
        self.status_text = ""
        self.status_tone = "plain"
        self.last_error: BaseException | None = None
        self.form: str | None = None  # the open form, one of FORMS
        self.question: Question | None = None
        self.export_modules: list[str] = []
        self.export_module: str | None = None
        self.export_path = ""
        self.compare_choices: list[tuple[str, str]] = []  # (label, snapshot id)
        self.compare_with: str | None = None
        self.result_html = ""
        self.progress: int | None = None  # percent of a restore in progress; None: none running
        self.events = StoreEvents(self._live_reload, throttle)
        self.events.watch(catalog)
        if guard is not None:
            self.events.watch(guard.catalog)
        self.refresh()

    @property
    def throttle(self) -> float:
        """Seconds between refreshes during a burst of store events."""
        return self.events.throttle

    @throttle.setter
    def throttle(self, seconds: float) -> None:
        self.events.throttle = seconds

    # -- status, forms, results -----------------------------------------------------------------
    def status_html(self) -> str:
        return model.status_html(self.status_text, self.status_tone)

    def say(self, text: str, tone: str = "plain") -> None:
        self.status_text, self.status_tone = text, tone
        self.on_change("status")

    def fail(self, text: str, exc: BaseException) -> None:
        self.last_error = exc
        self._set_progress(None)
        self.say(text, "error")

    def _open(self, form: str | None) -> None:
        self.form = form
        if form != "confirm":
            self.question = None
        self.on_change("form")

    def _set_progress(self, percent: int | None) -> None:
        if percent != self.progress:
            self.progress = percent
            self.on_change("progress")

    def _show_result(self, html: str) -> None:
        self.result_html = html
        self.on_change("result")

    # -- reading ----------------------------------------------------------------------------------
    @_action("read the snapshots")
    def refresh(self) -> None:
        """Read the store again (a Guard writing to the same store is heard through the store's events)."""
        self._reload(usage=True)

    @_action("select the snapshot")
    def select(self, snapshot_id: str | None) -> SnapshotInfo | None:
        """Make a snapshot (id, unique prefix, 'latest' or 'best:METRIC') the one the actions act on."""
        if snapshot_id is None:
            return None
        with self._lock:
            info = self._info(snapshot_id)
            if info.id != self.selected:
                self._open(None)
            self.selected = info.id
            self._layout()
            return info

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
    def restore(self, snapshot_id: str | None = None,
                confirm: bool = False) -> RestoreReport | action_text.RestorePlan | None:
        """Without ``confirm``: ask what would be overwritten (Confirm/Cancel) and return the plan.
        With it: restore into the namespace, report, and call ``on_restore``; returns the report."""
        with self._lock:
            info = self.select(snapshot_id) if snapshot_id else self._info(None)
            if info is None:
                return None
            namespace = self._require_namespace()
            snapshot = self.catalog.get(info.id, info.run)
            if not confirm:
                plan = action_text.plan_restore(info, snapshot.manifest, namespace)
                self._ask(Question("restore", info.id, action_text.plan_html(plan), "Confirm restore", "warning"))
                return plan
            self._open(None)
            self.say(f"Restoring snapshot {info.id}…", "busy")
            self._set_progress(0)
            try:
                report = self._restore(snapshot, namespace)
            finally:
                self._set_progress(None)
            self._show_result(action_text.report_html(report, snapshot.manifest["objects"]))
            where = f" ({info.label})" if info.label else ""
            if report.missing:
                self.say(f"Restored snapshot {info.id}{where}, except {', '.join(report.missing)}: not defined in "
                         "the kernel yet (see below).", "warn")
            else:
                self.say(f"Restored snapshot {info.id}{where}.", "ok")
        if self.on_restore is not None:
            try:
                self.on_restore(info)
            except Exception as exc:
                self.fail(f"Restored snapshot {info.id}, but on_restore failed: {type(exc).__name__}: {exc}", exc)
        return report

    def _restore(self, snapshot: Snapshot, namespace: MutableMapping[str, Any]) -> RestoreReport:
        """Through the session's guard when the snapshot is in the guard's own store (read into its
        staging memory, which then changes places with the live tensors', and its next save descends
        from the snapshot); a snapshot of another store is restored on its own."""
        if self.guard is not None and self.guard.catalog.store.url == self.catalog.store.url:
            return self.guard.restore_from(snapshot, namespace=namespace, progress=self._restored)
        return snapshot.restore(namespace=namespace, progress=self._restored)

    def _restored(self, done: int, total: int) -> None:
        self._set_progress(100 if not total else int(100 * done / total))

    def _require_namespace(self) -> MutableMapping[str, Any]:
        if self.namespace is None:
            raise UsageError("this panel has no namespace to restore into: open it with "
                             "nbguard.panel(..., namespace=globals())")
        return self.namespace

    def _ask(self, question: Question) -> None:
        self.question = question
        self._open("confirm")
        self.say("Waiting for you to confirm or cancel; nothing has changed yet.", "plain")

    def confirm(self) -> Any:
        """Carry out the restore or delete that is waiting for confirmation."""
        question, self.question = self.question, None
        if question is None:
            self.say("Nothing is waiting for confirmation.", "plain")
            return None
        if question.action == "restore":
            return self.restore(question.snapshot_id, confirm=True)
        return self.delete(question.snapshot_id, confirm=True)

    def cancel(self) -> None:
        """Drop the pending confirmation or the open export/compare form."""
        self._open(None)
        self.say("Cancelled: nothing was changed.", "plain")

    # -- changing ---------------------------------------------------------------------------------------
    @_action("pin the snapshot")
    def pin(self, snapshot_id: str | None = None) -> SnapshotInfo:
        """Pinned snapshots survive retention."""
        with self._lock:
            info = self._info(snapshot_id)
            info = self.catalog.pin(info.id, info.run)
            self._reload()
            self.say(f"Pinned snapshot {info.id}: cleanup keeps it until you unpin it.", "ok")
            return info

    @_action("unpin the snapshot")
    def unpin(self, snapshot_id: str | None = None) -> SnapshotInfo:
        with self._lock:
            info = self._info(snapshot_id)
            info = self.catalog.unpin(info.id, info.run)
            self._reload()
            self.say(f"Unpinned snapshot {info.id}: cleanup may delete it once it is old enough.", "ok")
            return info

    def toggle_pin(self, snapshot_id: str | None = None) -> SnapshotInfo | None:
        """Pin, or unpin when it is pinned (the Pin/Unpin button)."""
        info = self.select(snapshot_id) if snapshot_id else self.selected_info()
        if info is None:
            if not snapshot_id:
                self.say("No snapshot is selected: pick one in the list first.", "error")
            return None
        return self.unpin(info.id) if info.pinned else self.pin(info.id)

    @_action("delete the snapshot")
    def delete(self, snapshot_id: str | None = None, confirm: bool = False) -> SnapshotInfo | None:
        """Without ``confirm``: ask. With it: delete (manifest first, then unused tensor files)."""
        with self._lock:
            info = self._info(snapshot_id)
            if not confirm:
                self.selected = info.id
                self._layout()
                self._ask(Question("delete", info.id, action_text.delete_html(info, self.catalog.store.url),
                                   "Delete it", "danger"))
                return None
            self._open(None)
            neighbor = self._neighbor(info)
            self.catalog.delete(info.id, info.run)
            if self.selected == info.id:
                self.selected = neighbor
            self._reload(usage=True)
            self.say(f"Deleted snapshot {info.id}.", "ok")
            return info

    # -- exporting and comparing -------------------------------------------------------------------------
    @_action("prepare the export")
    def show_export(self, snapshot_id: str | None = None) -> list[str]:
        """Open the export form for a snapshot; returns the module names it offers."""
        with self._lock:
            info = self._info(snapshot_id)
            names = action_text.module_names(self.catalog.get(info.id, info.run).manifest["objects"])
            if not names:
                raise UsageError(f"snapshot {info.id} holds no module or other object with a state_dict")
            self.export_modules, self.export_module = names, names[0]
            self.export_path = default_export_path(info, names[0])
            self._open("export")
            self.say("Pick a module and a file name, then Write .safetensors.", "plain")
            return names

    @_action("export the weights")
    def export(self, snapshot_id: str | None = None, module: str | None = None, path: str | None = None) -> str:
        """Write one module's weights from a snapshot to a ``.safetensors`` file; returns its path.
        Without ``module`` or ``path``: the export form's."""
        with self._lock:
            info = self._info(snapshot_id)
            if module is None:
                module = self.export_module or action_text.module_names(
                    self.catalog.get(info.id, info.run).manifest["objects"])[0]
            path = os.path.expanduser(path or self.export_path.strip() or default_export_path(info, module))
            written = self.catalog.export(info.id, module, path, run=info.run)
            self._open(None)
            self._show_result(action_text.export_html(module, info.id, written))
            self.say(f"Wrote the weights of {module} to {written} ({size(os.path.getsize(written))}).", "ok")
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
            self.compare_choices = [(model.make_row(s, self._number(s), (), now).label, s.id) for s in others]
            self.compare_with = self._previous(info) or others[0].id
            self._open("compare")
            self.say("Pick the snapshot to compare with, then Compare.", "plain")
            return [s.id for s in others]

    @_action("compare the snapshots")
    def compare(self, id_a: str | None = None, id_b: str | None = None) -> Comparison:
        """Metrics side by side and the tensors that changed most. Without ids: the form's choice
        against the selected snapshot, older one first."""
        with self._lock:
            if id_a is not None and id_b is not None:
                a, b = self._info(id_a), self._info(id_b)
            else:
                a = self._info(id_a)
                other = id_b or self.compare_with or self._previous(a)
                if other is None:
                    raise UsageError("there is no other snapshot to compare with")
                b = self._info(other)
                if b.created < a.created:
                    a, b = b, a
            comparison = self.catalog.compare(a.id, b.id)
            self._open(None)
            self._show_result(action_text.comparison_html(comparison))
            self.say(f"Compared {a.id} with {b.id}: {len(comparison.changed)} tensors changed.", "ok")
            return comparison

    # -- live updates -------------------------------------------------------------------------------------
    def _reload(self, usage: bool = False) -> None:
        with self._lock:
            self.events.dirty = False
            super()._reload(usage)

    @_action("update the list")
    def _live_reload(self) -> None:
        self._reload(usage=False)

    def process_pending(self) -> bool:
        """Apply pending store events now (what the timer does); True if there were any."""
        return self.events.process_pending()

    def wait_for_refresh(self, timeout: float = 5.0) -> bool:
        """Wait until every store event so far is shown; False on timeout (for tests and scripts)."""
        return self.events.wait_for_refresh(timeout)

    def close(self) -> None:
        """Stop listening to the store."""
        self.events.close()


def default_export_path(info: SnapshotInfo, module: str) -> str:
    return f"{info.run}-{module}-{info.id}.safetensors"
