"""Arming: turn on, only when a save was requested, the event that reports the next iteration end.

While nothing is pending the cell runs untraced. On a request:

* Python 3.12+: ``sys.monitoring`` local JUMP events on the instrumented code objects (the cell's
  and those of the functions it calls), from any thread; the callback sees the backward jump onto a
  loop's ``FOR_ITER``.
* Python 3.10/3.11: ``sys.settrace`` can only be turned on by the thread it traces, so another
  thread calls ``_thread.interrupt_main(ARM_SIGNAL)``; the handler installed for that spare signal
  runs in the main thread between two bytecodes and sets ``f_trace`` on every instrumented frame of
  the stack. The line event at a loop's ``FOR_ITER`` only follows a backward jump, i.e. the end of an
  iteration.

Either way the event is switched off again at the safe point, before the callback runs.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any, Protocol

# Signals nothing in a notebook uses, in order of preference: a real-time one where there are
# some (SIGUSR2 serves faulthandler.register now and then). interrupt_main() only simulates the
# signal: nothing is sent to the process. One whose handler was set from C is passed over.
_RT = signal.SIGRTMAX - 1 if hasattr(signal, "SIGRTMAX") else None
ARM_SIGNALS: tuple[int, ...] = tuple(s for s in (_RT, getattr(signal, "SIGUSR2", None), getattr(signal, "SIGBREAK", None))
                                     if s)
ARM_SIGNAL: int | None = ARM_SIGNALS[0] if ARM_SIGNALS else None
_TOOL_IDS = (4, 3)  # sys.monitoring ids that no standard tool claims (0-2 and 5 are named)

OnIterationEnd = Callable[[int], None]
#: id(code object) -> (the code object, {bytecode offset of a loop's FOR_ITER: loop id})
Ends = dict[int, tuple[CodeType, dict[int, int]]]


def ends_of(*units: tuple[CodeType, dict[int, int]]) -> Ends:
    """The iteration ends of several code objects, keyed for the arming classes."""
    return {id(code): (code, ends) for code, ends in units}


class Arming(Protocol):
    armed: bool

    def install(self) -> None: ...
    def uninstall(self) -> None: ...
    def arm(self) -> None: ...
    def disarm(self) -> None: ...


def make_arming(ends: Ends, on_end: OnIterationEnd) -> Arming:
    """The cheapest mechanism this interpreter offers."""
    if sys.version_info >= (3, 12):
        return MonitoringArming(ends, on_end)
    return TraceArming(ends, on_end)


class MonitoringArming:
    """sys.monitoring JUMP events, local to the instrumented code objects (3.12+)."""

    def __init__(self, ends: Ends, on_end: OnIterationEnd):
        self.ends, self.on_end = ends, on_end
        self.armed = False
        self._tool: int | None = None
        self._fallback: TraceArming | None = None
        self._lock = threading.Lock()

    def install(self) -> None:
        monitoring = sys.monitoring  # type: ignore[attr-defined]
        for tool in _TOOL_IDS:
            try:
                monitoring.use_tool_id(tool, "nbguard")
            except ValueError:
                continue
            self._tool = tool
            monitoring.register_callback(tool, monitoring.events.JUMP, self._on_jump)
            return
        self._fallback = TraceArming(self.ends, self.on_end)  # every id taken: trace instead
        self._fallback.install()

    def uninstall(self) -> None:
        if self._fallback is not None:
            self._fallback.uninstall()
            self._fallback = None
            return
        if self._tool is None:
            return
        monitoring = sys.monitoring  # type: ignore[attr-defined]
        with self._lock:
            self.disarm()
            monitoring.register_callback(self._tool, monitoring.events.JUMP, None)
            monitoring.free_tool_id(self._tool)
            self._tool = None

    def arm(self) -> None:
        if self._fallback is not None:
            self._fallback.arm()
            return
        with self._lock:
            if self._tool is not None and not self.armed:
                self.armed = True
                for code, _ in self.ends.values():
                    sys.monitoring.set_local_events(self._tool, code, sys.monitoring.events.JUMP)  # type: ignore[attr-defined]

    def disarm(self) -> None:
        if self._fallback is not None:
            self._fallback.disarm()
        elif self.armed and self._tool is not None:
            self.armed = False
            for code, _ in self.ends.values():
                sys.monitoring.set_local_events(self._tool, code, 0)  # type: ignore[attr-defined]

    def _on_jump(self, code: CodeType, offset: int, destination: int) -> Any:
        entry = self.ends.get(id(code))
        if entry is not None and entry[0] is code and self.armed:
            loop_id = entry[1].get(destination)
            if loop_id is not None:
                self.on_end(loop_id)


def _untrace_child() -> None:
    # A worker process forked while armed (a DataLoader starting its workers) must not inherit the
    # tracer: it would run every call of the worker through Python.
    trace = sys.gettrace()
    if isinstance(getattr(trace, "__self__", None), TraceArming):
        sys.settrace(None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_untrace_child)


class TraceArming:
    """sys.settrace on the instrumented frames, switched on in the main thread through a spare signal."""

    def __init__(self, ends: Ends, on_end: OnIterationEnd):
        self.ends, self.on_end = ends, on_end
        self.signum: int | None = None
        self.armed = False
        self._thread = threading.get_ident()
        self._handler_installed = False
        self._previous_handler: Any = None
        self._sent = False
        self._lock = threading.Lock()
        self._previous_trace: Any = None
        self._frames: list[tuple[FrameType, Any]] = []  # instrumented frames traced, with their own f_trace

    @property
    def cross_thread(self) -> bool:
        """Whether requests from other threads can arm (False outside the main thread)."""
        return self._handler_installed

    def install(self) -> None:
        self._thread = threading.get_ident()
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in ARM_SIGNALS:
            try:
                if signal.getsignal(signum) is None:
                    continue
                self._previous_handler = signal.signal(signum, self._on_signal)
            except (ValueError, OSError):
                continue
            self.signum, self._handler_installed = signum, True
            return

    def uninstall(self) -> None:
        with self._lock:
            installed, self._handler_installed = self._handler_installed, False
        spins = 0
        while self._sent and spins < 1000:  # let a simulated signal already on its way reach our handler
            spins += 1
        self._sent = False
        self.disarm()
        if installed:
            previous = self._previous_handler
            signal.signal(self.signum, previous if previous is not None else signal.SIG_DFL)  # type: ignore[arg-type]

    def arm(self) -> None:
        if self.armed:
            return
        if threading.get_ident() == self._thread:
            self._arm_here(sys._getframe(1))
            return
        with self._lock:
            if self._handler_installed and not self._sent:
                self._sent = True
                _thread.interrupt_main(self.signum)  # type: ignore[arg-type]  # set with _handler_installed

    def disarm(self) -> None:
        if not self.armed:
            return
        self.armed = False
        sys.settrace(self._previous_trace)
        for frame, previous in self._frames:
            frame.f_trace = previous
        self._frames = []
        self._previous_trace = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._sent:  # a real signal of that number: pass it on
            if callable(self._previous_handler):
                self._previous_handler(signum, frame)
            return
        self._sent = False
        if frame is not None:
            self._arm_here(frame)

    def _instrumented(self, frame: FrameType) -> dict[int, int] | None:
        entry = self.ends.get(id(frame.f_code))
        return entry[1] if entry is not None and entry[0] is frame.f_code else None

    def _arm_here(self, frame: FrameType | None) -> None:
        if self.armed:
            return
        self._previous_trace = sys.gettrace()
        self.armed = True
        sys.settrace(self._on_call)  # also catches instrumented frames that have not started yet
        while frame is not None:
            if self._instrumented(frame) is not None:
                self._frames.append((frame, frame.f_trace))
                frame.f_trace = self._on_line
            frame = frame.f_back

    def _on_call(self, frame: FrameType, event: str, arg: Any) -> Any:
        if self.armed and self._instrumented(frame) is not None:
            self._frames.append((frame, None))
            return self._on_line
        return None

    def _on_line(self, frame: FrameType, event: str, arg: Any) -> Any:
        if not self.armed:
            return None
        if event == "line":
            ends = self._instrumented(frame)
            loop_id = ends.get(frame.f_lasti) if ends is not None else None
            if loop_id is not None:
                self.on_end(loop_id)  # may disarm, and may raise into the cell
                if not self.armed:
                    return None
        return self._on_line
