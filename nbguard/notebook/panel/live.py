"""Store events into panel refreshes, off the writer's thread.

Catalog events arrive on the writer's (or uploader's) thread. The listener only sets a flag and, if
none is pending, starts a one-shot timer; the timer thread does the refresh, at most once per
``throttle`` seconds of a burst, so a save never waits for the panel.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ...engine.catalog import Catalog


class StoreEvents:
    """Listens to catalogs (and a replicated store's upload states) and calls ``refresh`` on a timer."""

    def __init__(self, refresh: Callable[[], Any], throttle: float = 1.0):
        self.refresh = refresh
        self.throttle = throttle
        self.dirty = False  # an event came that no refresh has shown yet; a refresh clears it
        self._wake = threading.Condition()  # the timer handshake, never held for long
        self._timer: threading.Timer | None = None
        self._ticking = False
        self._closed = False
        self._watched: set[int] = set()
        self._unsubscribe: list[Callable[[], Any]] = []

    def watch(self, catalog: Catalog) -> None:
        if id(catalog) in self._watched:
            return
        self._watched.add(id(catalog))
        self._unsubscribe.append(catalog.subscribe(self._on_event))
        on_change = getattr(catalog.store, "on_change", None)  # a replicated store's upload states
        if callable(on_change):
            self._unsubscribe.append(on_change(self._on_event))

    def _on_event(self, *_: Any) -> None:
        """Called on the writer's or uploader's thread: set a flag and arm the timer, nothing else."""
        self.dirty = True
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
        if not self.dirty or self._closed:
            return False
        self.refresh()
        return True

    def wait_for_refresh(self, timeout: float = 5.0) -> bool:
        """Wait until every store event so far is shown; False on timeout (for tests and scripts)."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self.dirty or self._timer is not None or self._ticking:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wake.wait(remaining)
        return True

    def close(self) -> None:
        """Stop listening; a timer already armed is cancelled."""
        self._closed = True
        with self._wake:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
