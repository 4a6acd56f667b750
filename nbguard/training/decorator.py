"""``@nbguard.checkpointed``: the guarantee of ``%%checkpointed`` for a training function in a script.

    @nbguard.checkpointed(every="10m")
    def train(epochs):
        for epoch in range(epochs):
            for x, y in loader:
                ...

    train(20)      # first run: trains, saving every 10 minutes at the end of an iteration
    train(20)      # after a kill: resumes mid-epoch, exactly, with no resume code in the script

The call runs through the same machinery as the magic (``CheckpointedCell``): the function's loops,
and those of the script's functions it calls, are safe points; its training objects and local
variables, the module's training objects it uses and every RNG are saved; SIGTERM and SIGINT save at
the next safe point, wait until that snapshot is durable, and end the process with exit status 143
(SIGTERM) or 130 (SIGINT) after a line saying how to continue.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

from ..engine.guard import print_report
from ..engine.retention import Policy
from ..errors import UsageError
from ..format.manifest import check_run_name
from .cell import RESULT_NAME, CheckpointedCell, StopAfterSave
from .options import CellOptions, parse_duration
from .session import Session
from .spelling import DECORATOR

F = TypeVar("F", bound=Callable[..., Any])

EXIT_SIGTERM = 128 + 15
EXIT_SIGINT = 128 + 2
_CALL = "__nbguard_call__"


@overload
def checkpointed(function: F) -> F: ...
@overload
def checkpointed(*, every: str | float = "5m", every_iter: int | None = None, keep: int = 3,
                 best: str | None = None, dir: str | None = None, name: str | None = None,
                 state: Sequence[str] | None = None, exclude: Sequence[str] = (), fresh: bool = False,
                 resume_from: str | None = None) -> Callable[[F], F]: ...


def checkpointed(function: Callable[..., Any] | None = None, *, every: str | float = "5m",
                 every_iter: int | None = None, keep: int = 3, best: str | None = None, dir: str | None = None,
                 name: str | None = None, state: Sequence[str] | None = None, exclude: Sequence[str] = (),
                 fresh: bool = False, resume_from: str | None = None) -> Any:
    """Guard a training function: autosave and exact resume, as ``%%checkpointed`` does for a cell.

    The options are those of the magic. ``dir`` defaults to ``nbguard-snapshots/<script>`` (or
    ``NBGUARD_DIR``), ``name`` (the run) to the function's name. A finished run is not trained again:
    the call restores its final state and returns what the function returned, when that was saved
    (a training object or a plain value); pass ``fresh=True`` (or delete the run) to train again.
    """
    options = CellOptions(
        every=parse_duration(every), every_iter=every_iter, keep=keep, best=Policy.parse_best(best) if best else None,
        name=check_run_name(name) if name else None, dir=dir, state=tuple(state) if state is not None else None,
        exclude=tuple(exclude), fresh=fresh, resume_from=resume_from, spelling=DECORATOR,
    )
    if every_iter is not None and (not isinstance(every_iter, int) or every_iter < 1):
        raise UsageError(f"every_iter must be a positive whole number, not {every_iter!r}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn) or not hasattr(fn, "__globals__"):
            raise UsageError(f"@nbguard.checkpointed guards a Python function, not {type(fn).__name__}")

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            return run_guarded(fn, args, kwargs, options)

        return guarded

    return decorate(function) if function is not None else decorate


def run_guarded(fn: Callable[..., Any], args: tuple, kwargs: dict, options: CellOptions) -> Any:
    """Call ``fn(*args, **kwargs)`` under guard (what a ``@checkpointed`` function does when called)."""
    from ..stores.place import default_dir

    namespace = fn.__globals__  # type: ignore[attr-defined]
    session = Session(namespace=namespace, report=print_report, default_dir=default_dir())
    run = options.name or check_run_name(fn.__name__.strip("_") or "main")
    # A one-line cell calling the function. It names the function as the module knows it (the
    # decorated wrapper, whose __wrapped__ leads discovery to the module's training objects it uses).
    known = fn.__name__ if getattr(namespace.get(fn.__name__), "__wrapped__", None) is fn else "None"
    source = f"{RESULT_NAME} = {_CALL}({known})\n"
    namespace[_CALL] = _Call(fn, args, kwargs)
    previous = _install_signals(session)
    try:
        cell = CheckpointedCell(source, namespace, options, session, run=run, filename=f"<{fn.__name__}()>",
                                entry=fn)
        try:
            cell.run()
        except StopAfterSave:
            print_report("interrupted: the state is saved; run the script again to continue from there")
            raise SystemExit(EXIT_SIGINT) from None
        return cell.result
    finally:
        _restore_signals(previous)
        namespace.pop(_CALL, None)
        namespace.pop(RESULT_NAME, None)
        for guard in session.guards.values():
            guard.close()


class _Call:
    """The guarded function and its arguments, as the synthetic one-line cell calls them."""

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict):
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def __call__(self, _named: Any) -> Any:
        return self.fn(*self.args, **self.kwargs)


def _install_signals(session: Session) -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        cell = session.running_cell
        if cell is not None:
            cell.request_shutdown()  # saved at the next safe point, then the process ends (143)
        else:
            sys.exit(EXIT_SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    return previous


def _restore_signals(previous: Any) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
