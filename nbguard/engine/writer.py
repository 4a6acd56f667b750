"""One background thread that does the slow part of every save.

At most one save is in flight. ``submit`` waits for the previous one (callers that would rather
skip a save check ``busy`` first). Pending work is flushed at interpreter exit, within a time limit.
No asyncio: Jupyter already runs an event loop.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

EXIT_TIMEOUT = float(os.environ.get("NBGUARD_EXIT_TIMEOUT", "60"))


class SaveHandle(Generic[T]):
    """The future of one save: ``done()``, ``wait()``, ``exception()``, ``result()``."""

    def __init__(self, snapshot_id: str):
        self.id = snapshot_id
        self._event = threading.Event()
        self._result: T | None = None
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        state = "failed" if self._error else "done" if self.done() else "in flight"
        return f"<SaveHandle {self.id} {state}>"

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the save is durable (or failed); False on timeout."""
        return self._event.wait(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The error that ended the save, or None (waits for it first)."""
        self._event.wait(timeout)
        return self._error

    def result(self, timeout: float | None = None) -> T:
        """The save's result, re-raising the original error if it failed."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"snapshot {self.id} is still being written")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def _finish(self, result: T | None, error: BaseException | None) -> None:
        self._result, self._error = result, error
        self._event.set()


class Writer:
    """A lazily started daemon thread running one job at a time."""

    def __init__(self, name: str = "nbguard-writer"):
        self._name = name
        self._cond = threading.Condition()
        self._job: tuple[Callable[[], Any], SaveHandle, Callable[[Any], None] | None] | None = None
        self._running: SaveHandle | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        _live_writers.add(self)

    @property
    def busy(self) -> bool:
        """Whether a save is queued or being written."""
        with self._cond:
            return self._job is not None or self._running is not None

    def submit(self, job: Callable[[], T], handle: SaveHandle[T],
               then: Callable[[T | None], None] | None = None) -> SaveHandle[T]:
        """Queue ``job``; waits while another save is in flight. ``then(result)`` runs on the writer
        thread after the handle is finished (None if the job failed), before the next job."""
        with self._cond:
            while self._job is not None or self._running is not None:
                self._cond.wait()
            if self._closed:
                from ..errors import UsageError
                raise UsageError("this Guard is closed: create a new Guard to save again")
            self._job = (job, handle, then)
            self._start_thread()
            self._cond.notify_all()
        return handle

    def start(self) -> None:
        """Start the thread now, ahead of the first save (whose stall would otherwise include
        ``Thread.start``: ~2 ms on 2 busy cores, measured); nothing once closed."""
        with self._cond:
            if not self._closed:
                self._start_thread()

    def _start_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def run_inline(self, job: Callable[[], T], handle: SaveHandle[T],
                   then: Callable[[T | None], None] | None = None) -> SaveHandle[T]:
        """Run ``job`` in the caller (streaming saves), after any save in flight."""
        self.flush()
        _run(job, handle, then)
        return handle

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until nothing is in flight; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._job is not None or self._running is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float | None = None) -> bool:
        flushed = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        _live_writers.discard(self)
        # Wait for the thread to end: a daemon thread still freeing tensors when the interpreter
        # finalizes is killed inside torch's C++ code, which aborts the process (std::terminate).
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return flushed

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._closed:
                    self._cond.wait()
                if self._job is None:
                    return
                job, handle, then = self._job
                self._job, self._running = None, handle
            try:
                _run(job, handle, then)
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()


def _run(job: Callable[[], T], handle: SaveHandle[T], then: Callable[[T | None], None] | None = None) -> None:
    try:
        result = job()
    except BaseException as exc:  # the handle re-raises it in the caller's thread
        handle._finish(None, exc)
        result = None
    else:
        handle._finish(result, None)
    if then is not None:
        try:
            then(result)
        except Exception:  # follow-up work (retention) reports its own errors
            pass


_live_writers: set[Writer] = set()


@atexit.register
def _flush_at_exit() -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT
    for writer in list(_live_writers):
        if writer.busy:
            if not writer.flush(max(0.0, deadline - time.monotonic())):
                print(
                    f"nbguard: a snapshot was still being written after {EXIT_TIMEOUT:.0f} s at exit and is "
                    "lost; earlier snapshots are intact (set NBGUARD_EXIT_TIMEOUT to wait longer)",
                    file=sys.stderr,
                )
