"""The IPython layer: ``%load_ext nbguard``, ``%%checkpointed`` and ``%nbguard``.

Each magic parses its line, makes one call on the core (``session``, ``cell``, ``catalog``) and
shows the result. All logic lives in the core, which works the same from a plain script.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from ..engine.retention import Policy
from ..errors import NbguardError, UsageError
from ..format.manifest import check_run_name, slug
from ..humanize import ago, clock, duration
from ..humanize import size as human_size
from ..stores.place import default_location, detect_platform, judge_location, notebook_identity
from ..training import session as sessions
from ..training.budget import default_budget, describe_default, parse_budget
from ..training.cell import CheckpointedCell, StopAfterSave
from ..training.session import CellOptions, Session, parse_duration
from . import drive_setup


def _report(message: str) -> None:
    print(f"nbguard: {message}", flush=True)


@magics_class
class NbguardMagics(Magics):
    """``%%checkpointed`` and ``%nbguard``."""

    def __init__(self, shell: Any, session: Session):
        super().__init__(shell)
        self.session = session
        self._cell_runs: dict[str, str] = {}

    @property
    def _shell(self) -> InteractiveShell:
        """The shell these magics are registered on (``Magics.shell`` may be None; here it never is)."""
        if self.shell is None:
            raise UsageError("the nbguard magics are not registered on an IPython shell")
        return self.shell

    @magic_arguments()
    @argument("--every", default=None, help="save on a timer, e.g. 30s, 10m, 1h (default 5m)")
    @argument("--every-iter", type=int, default=None, help="also save every N iterations of the outermost loop")
    @argument("--keep", type=int, default=None, help="keep the newest N snapshots (default 3)")
    @argument("--best", default=None, help="also keep the best snapshot by variable NAME[:min|max]")
    @argument("--name", default=None, help="run name (default: one per cell)")
    @argument("--dir", default=None, help="folder or URL for snapshots (default: shown by %%load_ext nbguard)")
    @argument("--state", default=None, help="capture exactly these names: a,b,c")
    @argument("--exclude", default=None, help="do not capture these names: x,y")
    @argument("--fresh", action="store_true", help="ignore earlier snapshots and start a new run")
    @argument("--resume-from", default=None, help="resume from this snapshot id (once: later runs continue from "
                                                  "the run's own newest snapshot)")
    @argument("--budget", default=None, help="save and stop cleanly before this much time has passed, e.g. 11h30m "
                                             "(default on Colab and Kaggle: before their session limit; 'off': none)")
    @cell_magic
    def checkpointed(self, line: str, cell: str) -> None:
        """Autosave the training state of this cell and resume it after a crash or disconnect.

        Example::

            %%checkpointed --every 10m --best val_loss:min
            for epoch in range(20):
                for x, y in loader:
                    loss = loss_fn(model(x), y)
                    opt.zero_grad(); loss.backward(); opt.step()
                sched.step()
                val_loss = evaluate(model)
                history.append(val_loss)

        The models, optimizers, schedulers, scalers and generators the cell uses (also through
        functions it calls) and the variables it changes are saved with every random number
        generator at the end of a loop iteration: on the timer, every N iterations, on interrupt
        and at shutdown. Run the cell again after a disconnect and it continues where it stopped,
        also after an edit that keeps its loops (more epochs, another learning rate). When it cannot
        (a wrong option, a model of other shapes, loops that changed), the cell stops with a one-line
        error saying what to do, so "Run all" stops there. --budget 11h30m saves, makes that snapshot
        durable and stops the cell before a session's time runs out.
        """
        __tracebackhide__ = True  # IPython leaves nbguard's frames out of the user's traceback
        # Every refusal raises, as a one-line UsageError: "Run all" must stop here, not go on to
        # cells that would use an untrained model.
        try:
            args = _parse(self.checkpointed.parser, line)
        except IPythonUsageError as exc:
            raise IPythonUsageError(f"nbguard: {exc}. The options are listed by %%checkpointed? "
                                    "(e.g. --every 10m --keep 3)") from None
        try:
            options = self._options(args)
            source = self._shell.transform_cell(cell)  # IPython syntax (%magics, !cmd) to Python
            if options.dir is None and (named := self.session.name_notebook_from_cell(source)):
                print(f"nbguard: {named}", flush=True)
            run = options.name or self._run_name(cell)
            guarded = CheckpointedCell(source, self._shell.user_ns, options, self.session, run=run,
                                       filename=self._filename())
            if args.dir is not None and options.dir is not None:  # once the place is known to work
                self._announce_dir(options.dir)
        except NbguardError as exc:
            raise IPythonUsageError(f"nbguard: {exc}") from None
        except SyntaxError as exc:
            raise IPythonUsageError(f"nbguard: the cell does not parse: {exc.msg} (line {exc.lineno})") from None
        try:
            guarded.run()
        except StopAfterSave as exc:
            raise IPythonUsageError(f"nbguard: {exc}") from None
        except NbguardError as exc:
            raise IPythonUsageError(f"nbguard: {exc}") from None

    def _announce_dir(self, location: str) -> None:
        """A --dir the session has not used yet: say where snapshots go, whether that survives a
        disconnect, and warn when the path looks like a mistyped Google Drive path."""
        if location in self.session.announced:
            return
        self.session.announced.add(location)
        place = judge_location(location, self.session.platform)
        print(f"nbguard: snapshots of this cell go to {place.path} ({place.why})", flush=True)
        if place.warning:
            print(f"nbguard: {place.warning}", flush=True)

    def _options(self, args: Any) -> CellOptions:
        base = self.session.defaults
        best = Policy.parse_best(args.best) if args.best else base.best
        if args.dir is not None and not args.dir.strip():
            raise UsageError("--dir '' names no folder: give a folder or URL, or leave --dir out for the default")
        return CellOptions(
            every=parse_duration(args.every) if args.every else base.every,
            every_iter=_positive(args.every_iter, "--every-iter") if args.every_iter is not None else base.every_iter,
            keep=_positive(args.keep, "--keep") if args.keep is not None else base.keep,
            best=best,
            name=check_run_name(args.name) if args.name else base.name,
            dir=args.dir or base.dir,
            state=tuple(_names(args.state)) if args.state else None,
            exclude=tuple(_names(args.exclude)) if args.exclude else (),
            fresh=args.fresh,
            resume_from=args.resume_from,
            budget=(parse_budget(args.budget) or 0.0) if args.budget is not None else base.budget,
        )

    def _run_name(self, cell: str) -> str:
        """One run per cell: the front end's cell id where it sends one, else the order in which
        guarded cells first ran in this kernel (stable under "Run all")."""
        metadata = getattr(self.shell, "parent_header", {}).get("metadata", {}) or {}
        cell_id = metadata.get("cellId") or metadata.get("cell_id")
        if isinstance(cell_id, str) and cell_id:
            return slug(f"cell-{cell_id[:12]}")
        key = cell.strip()
        if key not in self._cell_runs:
            n = len(set(self._cell_runs.values())) + 1
            self._cell_runs[key] = "train" if n == 1 else f"train-{n}"
        return self._cell_runs[key]

    def _filename(self) -> str:
        return f"<checkpointed-{self._shell.execution_count}>"

    @line_magic
    def nbguard(self, line: str) -> Any:
        """nbguard commands::

            %nbguard status                      what is guarded, last save, next save, where
            %nbguard save [--note TEXT]          a snapshot now (of the last guarded cell's state)
            %nbguard list                        the snapshots of this notebook
            %nbguard restore [ID|latest|best]    restore into the notebook's objects
            %nbguard config KEY=VALUE ...        defaults for later cells (every, every_iter, keep, best, dir, name)
            %nbguard panel                       the snapshot panel
            %nbguard drive [FOLDER]              keep snapshots in Google Drive through its API
            %nbguard gc                          remove unused files
        """
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise IPythonUsageError(f"nbguard: {exc} in {line!r}") from None
        command, rest = (words[0], words[1:]) if words else ("status", [])
        handler = getattr(self, f"_cmd_{command.replace('-', '_')}", None)
        if handler is None:
            raise IPythonUsageError(f"nbguard: unknown command {command!r}: use status, save, list, restore, config, "
                                    "panel, drive or gc")
        try:
            return handler(rest)
        except NbguardError as exc:
            raise IPythonUsageError(f"nbguard: {exc}") from None

    def _cmd_status(self, rest: list[str]) -> None:
        print(self.session.status_text())

    def _cmd_save(self, rest: list[str]) -> None:
        note = None
        if rest[:1] == ["--note"]:
            note = " ".join(rest[1:]) or None
        elif rest:
            raise UsageError("usage: %nbguard save [--note TEXT]")
        handle = self.session.save_now(note=note)
        print(f"nbguard: snapshot {handle.id} is staged and being written in the background")

    def _cmd_list(self, rest: list[str]) -> None:
        self.session.flush(10)
        catalog = self.session.catalog(rest[0] if rest else None)
        snapshots = catalog.snapshots()
        if not snapshots:
            print(f"nbguard: no snapshots in {catalog.store.url} yet")
            return
        from .panel.model import storage_kind, storage_label

        kind, remote = storage_kind(catalog.store)
        for s in snapshots:
            metrics = " ".join(f"{k}={v:.4g}" for k, v in list(s.metrics.items())[:3])
            flags = " ".join(f"[{t}]" for t in (("pinned",) if s.pinned else ()) + s.tags)
            where = storage_label(s.state, kind, remote)[0]  # the panel's words: "on disk", "safe in Drive"
            print(f"{s.id}  {s.run:<12} {clock(s.created)} ({ago(s.created)})  {s.label:<22} {metrics}  "
                  f"{human_size(s.size)}  {where}  {flags}")

    def _cmd_restore(self, rest: list[str]) -> None:
        ref = rest[0] if rest else "latest"
        report = self.session.restore(ref)
        print(f"nbguard: {report.describe()}. Re-running the training cell continues from this snapshot.")

    def _cmd_config(self, rest: list[str]) -> None:
        settings = {}
        for item in rest:
            key, sep, value = item.partition("=")
            if not sep:
                raise UsageError(f"config takes KEY=VALUE pairs, not {item!r}")
            settings[key.strip().replace("-", "_")] = value.strip()
        options = self.session.configure(**settings)
        print(f"nbguard: defaults for later cells: every {options.every:.0f} s, keep {options.keep}"
              + (f", best {options.best[0]} ({options.best[1]})" if options.best else "")
              + (f", every {options.every_iter} iterations" if options.every_iter else "")
              + (f", time budget {duration(options.budget)}" if options.budget else "")
              + (", no time budget" if options.budget == 0 else "")
              + (f", folder {self.session.place_sentence(options.dir)}" if options.dir else ""))

    def _cmd_panel(self, rest: list[str]) -> Any:
        from .panel import open_panel

        location = rest[0] if rest else self.session.default_dir
        cell = self.session.running_cell or self.session.last_cell
        best = cell.options.best if cell is not None and cell.options.best else self.session.defaults.best
        return open_panel(location, namespace=self._shell.user_ns, guard=self.session.active_guard(),
                          place_text=self.session.place_sentence(location),
                          on_restore=self.session.on_panel_restore, best_metric=":".join(best) if best else None)

    def _cmd_drive(self, rest: list[str]) -> None:
        print(drive_setup.connect(self.session, rest[0] if rest else None))

    def _cmd_gc(self, rest: list[str]) -> None:
        head, *kept = self.session.catalog().gc().lines()
        print(f"nbguard: {head}")
        for line in kept:
            print(line)


def _parse(parser: Any, line: str) -> Any:
    """The magic's options, split as a shell would (quotes removed: --dir 'with space/x')."""
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        raise IPythonUsageError(f"{exc} in {line.strip()!r}") from None
    return parser.parse_args(argv)


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise UsageError(f"{flag} must be at least 1")
    return value


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise UsageError(f"not variable names: {', '.join(bad)} (give names separated by commas, e.g. model,opt)")
    return names


_loaded: dict[int, tuple[NbguardMagics, Session]] = {}


def load_extension(shell: Any) -> None:
    """Register the magics and handlers once per shell; print where snapshots go."""
    if id(shell) in _loaded:
        print(_loaded[id(shell)][1].banner())
        return
    platform = detect_platform(shell=shell)
    identity = notebook_identity(shell=shell)
    place = default_location(platform, identity)
    why = place.why if place.survives_disconnect else f"{place.why}; to keep them, mount Google Drive or run %nbguard drive"
    session = Session(shell.user_ns, _report, place.path, place_text=why, notebook=identity.name,
                      platform=platform, platform_budget=default_budget(platform))
    session.place_warning = place.warning
    # A kernel started by jupyter_client, papermill or nbconvert does not say which notebook it
    # runs: rather than every such notebook sharing "notebook", name it after its training cell.
    session.name_pending = identity.source == "default" and platform == "jupyter" and not os.environ.get("NBGUARD_DIR")
    session.install_handlers()
    magics = NbguardMagics(shell, session)
    shell.register_magics(magics)
    _loaded[id(shell)] = (magics, session)
    sessions.set_current(session)
    print(session.banner())
    limit = describe_default(platform)
    if limit:
        print(f"nbguard: {limit}")


def unload_extension(shell: Any) -> None:
    """Remove the magics and handlers that ``load_extension`` added."""
    entry = _loaded.pop(id(shell), None)
    if entry is None:
        return
    magics, session = entry
    session.remove_handlers()
    for kind in ("cell", "line"):
        table = shell.magics_manager.magics[kind]
        for name in magics.magics[kind]:
            table.pop(name, None)
    shell.magics_manager.registry.pop(type(magics).__name__, None)
    if sessions.current() is session:
        sessions.set_current(None)
