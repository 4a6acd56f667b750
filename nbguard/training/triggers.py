"""What asks a running cell for a safe point besides its own loops: a timer, the budget, Ctrl-C.

A request only sets a flag in the loop runtime; the save happens at the end of the current
iteration, in the thread running the cell. The timer asks every ``--every`` seconds, asks once more
when the writer is free again after a request it had to pass over (``retry_when_free``), and once
when the time budget is nearly used up. Ctrl-C asks for an interrupt safe point; a second one
within ``DOUBLE_INTERRUPT_SECONDS`` stops the cell at once. SIGTERM (``exit_after_save``) ends the
process once its snapshot is taken.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from ..engine.guard import Guard, Reporter
from .budget import Budget
from .loops import LoopRuntime

DOUBLE_INTERRUPT_SECONDS = 3.0


class SafePointTriggers:
    """The timer thread and the SIGINT handler of one cell run, between ``start`` and ``stop``."""

    def __init__(self, runtime: LoopRuntime, guard: Guard, *, every: float, budget: Budget | None):
        self.runtime = runtime
        self.guard = guard
        self.every = every
        self.budget = budget
        self.retry_when_free = False  # a timer request was passed over while the writer was busy
        self._stop_requested = 0.0
        self._done = threading.Event()
        self._previous_sigint: Any = None

    def start(self, *, sigint: bool) -> None:
        """Start the timer; with ``sigint``, Ctrl-C asks for a safe point (else it stops at once)."""
        self._previous_sigint = _install(signal.SIGINT, self._on_sigint) if sigint else None
        threading.Thread(target=self._timer, name="nbguard-timer", daemon=True).start()

    def stop(self) -> None:
        """Stop the timer and put the previous SIGINT handler back."""
        self._done.set()
        _restore_handler(signal.SIGINT, self._previous_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self._stop_requested and now - self._stop_requested < DOUBLE_INTERRUPT_SECONDS:
            raise KeyboardInterrupt  # second interrupt: stop at once
        self._stop_requested = now
        print("nbguard: interrupt received — saving at the end of this iteration (interrupt again to stop now)",
              flush=True)
        self.runtime.request_safe_point("interrupt")

    def _timer(self) -> None:
        interval = self.every
        next_at = time.monotonic() + interval
        budget_asked = False
        while not self._done.wait(min(0.5, max(0.0, next_at - time.monotonic()))):
            if self.retry_when_free and not self.guard.busy:
                self.retry_when_free = False
                self.runtime.request_safe_point("timer")
            if time.monotonic() >= next_at:
                next_at = time.monotonic() + interval
                self.runtime.request_safe_point("timer")
            if self.budget is not None and not budget_asked and self.budget.due(self._save_cost()):
                budget_asked = True
                self.runtime.request_safe_point("budget")

    def _save_cost(self) -> float:
        """Seconds the last save took until durable (1 s before the first): how early the budget asks."""
        stats = self.guard.last_stats
        return stats.durable_after if stats is not None else 1.0


def exit_after_save(guard: Guard, report: Reporter) -> None:
    """SIGTERM asked the running cell for a snapshot, which is taken: end the process as SIGTERM would."""
    guard.flush(30)
    report("saved a snapshot before shutting down (SIGTERM); run it again to resume from there")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install(signum: int, handler: Callable[[int, Any], None]) -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signum)
    signal.signal(signum, handler)
    return previous


def _restore_handler(signum: int, previous: Any) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signum, previous)
