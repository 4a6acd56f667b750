"""The list the panel shows, without widgets: the snapshots of a Catalog grouped by run, the page,
the selection, and the header, table and chart of them as HTML. ``PanelController`` adds the actions.

After each change it calls ``on_change(part)`` (one of ``PARTS``), which the view maps to traits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

from ...engine.catalog import Catalog
from ...errors import SnapshotError, UsageError
from ...format.manifest import SnapshotInfo
from . import model
from .chart import chart_svg

if TYPE_CHECKING:  # for WriterSource's annotations only, as in controller.py
    from ...engine.report import ProgressFn, RestoreReport
    from ...engine.snapshot import Snapshot

USAGE_MAX_AGE = 10.0  # seconds: a live refresh re-sums the store's size at most this often
PARTS = ("list", "form", "status", "result", "progress")  # what on_change says changed


class SaveStats(Protocol):
    @property
    def durable_after(self) -> float: ...


class WriterSource(Protocol):
    """What the panel uses of the session's ``Guard``: its catalog and its background writer, and its
    staging memory to restore a snapshot of its own store (``restore_from``)."""

    @property
    def catalog(self) -> Catalog: ...
    @property
    def busy(self) -> bool: ...
    @property
    def last_saved(self) -> SnapshotInfo | None: ...
    @property
    def last_error(self) -> BaseException | None: ...
    @property
    def last_stats(self) -> SaveStats | None: ...
    def restore_from(self, snapshot: Snapshot, state: Mapping[str, Any] | None = None, *,
                     namespace: MutableMapping[str, Any] | None = None, rng: bool = True,
                     progress: ProgressFn | None = None) -> RestoreReport: ...


class Listing:
    """Snapshots of one store (or one ``run`` of it), newest run first, one page on screen."""

    def __init__(self, catalog: Catalog, *, run: str | None = None, guard: WriterSource | None = None,
                 page_size: int = 20, place_text: str | None = None, best_metric: str | None = None):
        if type(page_size) is not int or page_size < 1:
            raise UsageError(f"page_size must be a whole number of at least 1, not {page_size!r}")
        self.catalog = catalog
        self.run = run
        self.guard = guard
        self.page_size = page_size
        self.place_text = place_text or default_place(catalog.store.url)
        self.best_metric = best_metric
        self.on_change: Callable[[str], Any] = lambda part: None  # the view
        self.snapshots: list[SnapshotInfo] = []  # grouped by run, newest first
        self.rows: list[model.Row] = []  # the page on screen
        self.page = model.paginate(0, 0, page_size)
        self.selected: str | None = None
        self.runs: list[str] = []
        self._by_id: dict[str, int] = {}
        self._badges: dict[str, tuple[str, ...]] = {}
        self._notes: dict[str, str] = {}
        self._usage: int | None = None
        self._usage_at = -1e9
        self._kind, self._remote = model.storage_kind(catalog.store)
        self._lock = threading.RLock()  # state and the view: the UI thread vs the refresh timer

    # -- as HTML ---------------------------------------------------------------------------------
    def header_html(self) -> str:
        """Where the snapshots live, how many, the space used, the background writer's state."""
        now = time.time()
        return model.header_html(self.place_text, self._usage, len(self.snapshots),
                                 len({s.run for s in self.snapshots}), self._writer(now), len(self.catalog.problems))

    def table_html(self) -> str:
        return model.table_html(self.rows, selected=self.selected, run_notes=self._notes)

    def chart_html(self) -> str:
        """The metrics of the selected snapshot's run (or of the run shown), or nothing."""
        info = self.selected_info()
        run = info.run if info else self.run
        if run is None:
            return ""
        of_run = [s for s in self.snapshots if s.run == run]
        best = model.run_best(of_run, self.best_metric)
        return chart_svg(of_run, selected=self.selected, best=best[2].id if best else None,
                         title=f"Metrics of run {run} over time, one point per snapshot:")

    def _writer(self, now: float) -> tuple[str, str] | None:
        if self.guard is None:
            return None
        stats = self.guard.last_stats
        return model.writer_status(self.guard.busy, self.guard.last_saved, self.guard.last_error,
                                   stats.durable_after if stats else None, now)

    # -- reading ----------------------------------------------------------------------------------
    def _reload(self, usage: bool = False) -> None:
        with self._lock:
            infos = self.catalog.snapshots(self.run)
            self.snapshots = model.grouped(infos)
            self._by_id = {s.id: i for i, s in enumerate(self.snapshots)}
            self._badges = model.badges(infos, self.best_metric)
            self._notes = model.run_notes(infos, self.best_metric)
            self.runs = self.catalog.runs()
            if usage or time.monotonic() - self._usage_at > USAGE_MAX_AGE:
                self._usage, self._usage_at = self.catalog.usage(), time.monotonic()
            self._layout()

    def _layout(self) -> None:
        """Page and rows from the selection (or the selection from the page)."""
        total = len(self.snapshots)
        if self.selected in self._by_id:
            self.page = model.paginate(total, self._by_id[self.selected] // self.page_size, self.page_size)
        else:
            self.page = model.paginate(total, self.page.number, self.page_size)
            self.selected = self.snapshots[self.page.start].id if total else None
        now = time.time()
        self.rows = [model.make_row(s, self.page.start + i + 1, self._badges.get(s.id, ()), now, self._kind,
                                    self._remote) for i, s in enumerate(self.snapshots[self.page.start:self.page.stop])]
        self.on_change("list")

    def show_page(self, number: int) -> model.Page:
        """Show page ``number`` (0-based, clamped) and select its first row."""
        with self._lock:
            self.page = model.paginate(len(self.snapshots), number, self.page_size)
            self.selected = None
            self._layout()
            return self.page

    def next_page(self) -> model.Page:
        return self.show_page(self.page.number + 1)

    def prev_page(self) -> model.Page:
        return self.show_page(self.page.number - 1)

    def selected_info(self) -> SnapshotInfo | None:
        return self.snapshots[self._by_id[self.selected]] if self.selected in self._by_id else None

    def _info(self, snapshot_id: str | None) -> SnapshotInfo:
        """The snapshot an action acts on: an id, a prefix, 'latest', 'best', or (None) the selected one."""
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

    def _number(self, info: SnapshotInfo) -> int:
        """1-based position of a listed snapshot."""
        return self._by_id[info.id] + 1

    def _previous(self, info: SnapshotInfo) -> str | None:
        """The next older snapshot of the same run."""
        older = [s for s in self.snapshots[self._by_id[info.id] + 1:] if s.run == info.run]
        return older[0].id if older else None

    def _neighbor(self, info: SnapshotInfo) -> str | None:
        """What to select once ``info`` is gone: the next older snapshot, else the next newer one."""
        index = self._by_id[info.id]
        near = self.snapshots[index + 1:index + 2] or self.snapshots[max(0, index - 1):index]
        return near[0].id if near else None


def default_place(url: str) -> str:
    if url.startswith("memory://"):
        return f"{url} (this kernel's memory: gone when the kernel stops)"
    return url
