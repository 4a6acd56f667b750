"""The notebook session: defaults, one Guard per run, and the handlers that outlive a cell.

There is one session per kernel (``current()``). The magics hold no state of their own: they
parse options and call into this object, which works the same from a plain script.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from ..engine.catalog import Catalog
from ..engine.guard import Guard, Reporter
from ..errors import UsageError
from ..format.manifest import SnapshotInfo
from ..humanize import ago
from ..humanize import duration as human_duration
from ..humanize import size as human_size
from ..stores.base import HasQuota, Staged
from .budget import Budget
from .options import CellOptions, configured
from .options import parse_duration as parse_duration  # callers import it from here


@dataclass
class Session:
    """Per-kernel state: defaults, guards by (store, run), the last guarded cell, the place."""

    namespace: MutableMapping[str, Any]
    report: Reporter
    default_dir: str
    place_text: str = ""
    notebook: str = "notebook"
    place_warning: str | None = None
    platform: str = "ipython"
    platform_budget: Budget | None = None  # the platform's session limit, when known
    announced: set[str] = field(default_factory=set)  # --dir places already described to the user
    name_pending: bool = False  # the notebook's name is unknown: taken from its first guarded cell
    defaults: CellOptions = field(default_factory=CellOptions)
    guards: dict[tuple[str, str], Guard] = field(default_factory=dict)
    last_cell: Any = None  # the CheckpointedCell that ran last (for %nbguard save / status)
    running_cell: Any = None
    start_points: dict[tuple[str, str], str] = field(default_factory=dict)  # (store, run) -> snapshot id
    _handlers: list[Callable[[], object]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def configure(self, **settings: Any) -> CellOptions:
        """Change defaults for later cells (``%nbguard config every=10m keep=5``)."""
        self.defaults = configured(self.defaults, settings)
        if settings.get("dir"):
            self.name_pending = False
        return self.defaults

    def budget_for(self, options: CellOptions) -> Budget | None:
        """The time budget of a guarded cell starting now: ``--budget``, else the platform's."""
        if options.budget == 0:
            return None
        if options.budget:
            return Budget(options.budget, time.monotonic(), "--budget")
        return self.platform_budget

    def make_durable(self, guard: Guard, timeout: float) -> bool:
        """Wait until the guard's last save is durable where it survives the session: written and
        committed, uploaded and verified for a replicated store (Drive), flushed for a mount."""
        deadline = time.monotonic() + timeout
        ok = guard.flush(timeout)
        store = guard.store
        if isinstance(store, Staged):
            ok = bool(store.flush(max(0.0, deadline - time.monotonic()))) and ok
        if isinstance(store, Staged) and store.remote_kind == "mount" and hasattr(os, "sync"):
            os.sync()  # a finished write on a FUSE mount (Colab's Drive) is not yet in the cloud
        return ok

    def name_notebook_from_cell(self, source: str) -> str | None:
        """In a kernel that does not say which notebook it runs (started by jupyter_client,
        papermill or nbconvert), name this notebook's folder after its first guarded cell instead
        of sharing one folder with every such notebook. Returns the line to print, once."""
        if not self.name_pending:
            return None
        from ..stores.place import FOLDER, name_from_cell

        self.name_pending = False
        self.notebook = name_from_cell(source)
        self.default_dir = os.path.join(os.path.dirname(self.default_dir.rstrip(os.sep)), self.notebook)
        return (f"this kernel does not say which notebook it runs (no JPY_SESSION_NAME: jupyter_client, papermill "
                f"or nbconvert), so this notebook's snapshots go to {self.default_dir}, named after the loops of "
                f"its training cell. To choose the folder: set NBGUARD_DIR, or run %nbguard config dir=PATH "
                f"before the training cell (or give it --dir PATH); a {FOLDER} folder is shared by the notebooks "
                "next to it")

    def place_sentence(self, location: str) -> str:
        """'/path/to/folder (in your Google Drive)': where, and whether that survives a disconnect."""
        if location == self.default_dir:
            return f"{location} ({self.place_text})" if self.place_text else location
        from ..stores.place import judge_location

        return f"{location} ({judge_location(location, self.platform).why})"

    def store_location(self, options: CellOptions) -> str:
        return options.dir or self.default_dir

    def guard(self, options: CellOptions, run: str) -> Guard:
        """The Guard of a run (kept between cell runs so staging buffers are reused)."""
        location = self.store_location(options)
        key = (location, run)
        with self._lock:
            guard = self.guards.get(key)
            if guard is None:
                guard = Guard(location, run=run, keep=options.keep, best=options.best, report=self.report)
                self.guards[key] = guard
            else:
                guard.policy = options.policy()
        return guard

    def catalog(self, location: str | None = None) -> Catalog:
        location = location or self.default_dir
        for (loc, _), guard in self.guards.items():
            if loc == location:
                return guard.catalog
        return Catalog(location)

    def set_start_point(self, location: str, info: SnapshotInfo) -> None:
        """A snapshot restored by hand (panel, %nbguard restore) becomes where its run resumes."""
        self.start_points[(location, info.run)] = info.id

    def banner(self) -> str:
        """The one line ``%load_ext nbguard`` prints."""
        if self.name_pending:
            folder = os.path.dirname(self.default_dir.rstrip(os.sep))
            return (f"nbguard: snapshots of this notebook go to {folder}{os.sep}<name> ({self.place_text}); this kernel "
                    "does not say which notebook it runs, so <name> comes from the training cell when it first runs "
                    "(set NBGUARD_DIR to choose the folder)")
        text = f"nbguard: snapshots of this notebook go to {self.default_dir}"
        if self.place_text:
            text += f" ({self.place_text})"
        try:
            snapshots = Catalog(self.default_dir).snapshots() if os.path.isdir(self.default_dir) or "://" in self.default_dir else []
        except Exception:
            snapshots = []
        if snapshots:
            newest = snapshots[0]
            where = f", {newest.label}" if newest.label else ""
            text += (f". {len(snapshots)} snapshot{'s' if len(snapshots) != 1 else ''} found, newest {ago(newest.created)}"
                     f"{where}: {_what_rerun_does(newest)}, or open %nbguard panel")
        return text

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for every pending save of this session."""
        return all(guard.flush(timeout) for guard in list(self.guards.values()))

    def active_guard(self) -> Guard | None:
        cell = self.running_cell or self.last_cell
        return cell.guard if cell is not None else None

    def status_text(self) -> str:
        """``%nbguard status``: where, what is guarded, the last and next save, the writer."""
        lines = [f"snapshots go to {self.default_dir}" + (f" ({self.place_text})" if self.place_text else "")]
        if self.place_warning:
            lines.append(self.place_warning)
        lines.extend(_drive_lines(self.catalog(self.store_location(self.defaults))))
        cell = self.running_cell or self.last_cell
        if cell is None:
            lines.append("no %%checkpointed cell has run yet in this session")
        else:
            lines.append(f"guarded run: {cell.run_name} in {cell.location}")
            if cell.discovery is not None:
                lines.append(cell.discovery.describe())
            guard = cell.guard
            if guard.last_saved is not None:
                last = guard.last_saved
                lines.append(f"last save: {last.id}, {ago(last.created)}" + (f", {last.label}" if last.label else ""))
            if self.running_cell is not None:
                lines.append(f"next save: within {cell.options.every:.0f} s of the last one, at the end of a loop iteration")
                if cell.budget is not None:
                    lines.append(f"time budget: {cell.budget.text()}; the cell saves and stops cleanly within "
                                 f"{human_duration(max(0.0, cell.budget.left()))}")
            lines.append("writer: " + ("writing a snapshot" if guard.busy else "idle")
                         + (f"; last error: {guard.last_error}" if guard.last_error else ""))
        return "\n".join(f"nbguard: {line}" for line in lines)

    def save_now(self, note: str | None = None) -> SnapshotInfo | Any:
        """``%nbguard save``: the state of the last guarded cell, or every training object in the
        namespace plus the RNGs. Returns the save handle (the save is staged, not yet durable)."""
        cell = self.last_cell
        if cell is not None:
            return cell.save(None, tags=("manual",), note=note)
        from .discover import training_objects

        objects = training_objects(dict(self.namespace))
        if not objects:
            raise UsageError("there is nothing to save yet: no models, optimizers or other training objects in the "
                             "notebook (run the cells that create them first)")
        guard = self.guard(self.defaults, "manual")
        return guard.save(objects, tags=("manual",), note=note)

    def restore(self, ref: str = "latest"):
        """``%nbguard restore``: a snapshot into the notebook's objects; it also becomes the point the
        run's %%checkpointed cell continues from."""
        catalog = self.catalog()
        self.flush()
        snapshot = catalog.get(ref)
        cell = self.last_cell
        if cell is not None:  # through its guard: read into the staging memory its saves keep warm
            report = cell.guard.restore_from(snapshot, namespace=self.namespace)
        else:
            report = snapshot.restore(namespace=self.namespace)
        self.set_start_point(self.default_dir, snapshot.info)
        return report

    def on_panel_restore(self, info: SnapshotInfo) -> None:
        self.set_start_point(self.default_dir, info)

    # -- process-level handlers --------------------------------------------------------------
    def install_handlers(self) -> None:
        """Flush pending saves at exit and take a final snapshot if training state changed."""
        atexit.register(self.at_exit)
        self._handlers.append(lambda: atexit.unregister(self.at_exit))
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
            previous = signal.getsignal(signal.SIGTERM)

            def on_term(signum: int, frame: Any) -> None:
                cell = self.running_cell
                if cell is not None:
                    cell.request_shutdown()
                    return
                self.at_exit()
                signal.signal(signal.SIGTERM, previous if callable(previous) else signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

            signal.signal(signal.SIGTERM, on_term)
            self._handlers.append(lambda: signal.signal(signal.SIGTERM, previous))

    def remove_handlers(self) -> None:
        while self._handlers:
            self._handlers.pop()()

    def at_exit(self, timeout: float = 60.0) -> None:
        """Kernel shutdown or restart while idle: a final snapshot if the guarded objects changed
        since their last snapshot, then flush every pending write (best effort, time-limited)."""
        cell = self.last_cell
        if cell is not None and self.running_cell is None:
            try:
                cell.save_if_changed(reason="shutdown")
            except Exception as exc:  # best effort: never block the shutdown
                self.report(f"the final snapshot at shutdown failed: {exc}")
        for guard in list(self.guards.values()):
            if not guard.flush(timeout):
                self.report("a snapshot was still being written at shutdown and may be incomplete; "
                            "earlier snapshots are intact")


def _what_rerun_does(info: SnapshotInfo) -> str:
    """What re-running the training cell will do with this snapshot: never promise a resume the cell
    will not perform (a snapshot without loop positions, of a loop nbguard could not reach)."""
    position = info.position if isinstance(info.position, dict) else {}
    if position.get("completed"):
        return "re-running the training cell restores its final state without training again"
    if any(key not in ("label", "completed") for key in position):
        return "re-run the training cell to resume"
    return f"it holds no loop position to resume from (`%nbguard restore {info.id}` loads it)"


def _drive_lines(catalog: Catalog) -> list[str]:
    """Quota and upload state when snapshots go to Google Drive (or another replicated place)."""
    store = catalog.store
    if not isinstance(store, Staged):
        return []
    lines = [f"uploads waiting: {store.pending()}" + (f"; last problem: {store.last_error}" if store.last_error else "")]
    if isinstance(store.remote, HasQuota):
        try:
            used, total = store.remote.quota()
            ours = catalog.usage()
            lines.append(f"Google Drive: {human_size(used)} of {human_size(total) if total else 'unlimited'} used; "
                         f"nbguard's snapshots here: {human_size(ours)}")
        except Exception as exc:
            lines.append(f"Google Drive quota unavailable: {exc}")
    return lines


_current: Session | None = None


def current() -> Session | None:
    """The session of this kernel, if the extension is loaded."""
    return _current


def set_current(session: Session | None) -> None:
    """Make ``session`` this kernel's (None when the extension is unloaded); ``default_dir()`` follows it."""
    from ..stores.place import use_kernel_folder

    global _current
    _current = session
    use_kernel_folder(None if session is None else lambda: session.store_location(session.defaults))
