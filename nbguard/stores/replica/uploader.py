"""The copying thread of a ReplicatedStore: one FIFO of uploads, deletes and scans, retried in
order, plus the durability state of every path it touched."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from ...errors import StoreError
from ..base import FileInfo, Store
from .remote import RemoteSide, chunks, folder_of, is_blob, upload_rank, walk

LOCAL = "local"
UPLOADING = "uploading"
VERIFIED = "verified"
SYNC_PENDING = "written, sync pending"
UNCHECKED = "on remote, unchecked"
REMOTE_ONLY = "remote only"
FAILED = "failed"
MISSING = "missing"
STATES = (LOCAL, UPLOADING, VERIFIED, SYNC_PENDING, UNCHECKED, REMOTE_ONLY, FAILED, MISSING)

Listener = Callable[[str, str], None]


@dataclass(eq=False)
class _Op:
    kind: str  # 'upload' | 'delete' | 'scan'
    path: str = ""
    cancelled: bool = False


class Uploader:
    """Copies local files to the remote on one daemon thread, started by the first job.

    Jobs run strictly in order and the queue waits behind a failing one: skipping a blob would let
    its manifest through. Thread-safe: jobs may be added from any thread.
    """

    def __init__(self, local: Store, remote: RemoteSide, *, scan_first: bool, retry_interval: float,
                 max_retry_interval: float, chunk_size: int):
        self.local = local
        self.remote = remote
        self.copied = SYNC_PENDING if remote.kind == "mount" else VERIFIED  # the most a copy can claim
        self._retry_interval = retry_interval
        self._max_retry_interval = max_retry_interval
        self._chunk_size = chunk_size
        # _emit_lock keeps callbacks in the order of the state changes; always taken before _lock.
        self._emit_lock = threading.RLock()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: deque[_Op] = deque()
        self._queued: dict[str, _Op] = {}  # path -> its upload waiting in _queue
        self._deleting: Counter[str] = Counter()  # remote deletes not done yet: hidden from reads
        self._current: _Op | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._scan_pending = scan_first
        self._states: dict[str, str] = {}
        self._listeners: list[Listener] = []
        self.last_error: str | None = None

    # ----- jobs -----------------------------------------------------------------------------------

    def upload(self, path: str) -> None:
        """Queue the copy of a file just committed locally."""
        with self._emit_lock:
            with self._cond:
                queued = self._enqueue_upload(path)
                if queued:
                    self._states[path] = LOCAL
                self._start()
            if queued:
                self._emit(path, LOCAL)

    def delete(self, path: str) -> None:
        """Queue a remote delete; a waiting upload of ``path`` is dropped, one in flight cancelled."""
        with self._emit_lock:
            with self._cond:
                op = self._queued.pop(path, None)
                if op is not None:
                    self._queue.remove(op)
                if self._current is not None and self._current.kind == "upload" and self._current.path == path:
                    self._current.cancelled = True
                self._states.pop(path, None)
                self._deleting[path] += 1
                self._queue.append(_Op("delete", path))
                self._start()
            self._emit(path, MISSING)

    def resync(self) -> None:
        """Put a scan for local files missing on the remote at the head of the queue."""
        with self._cond:
            self._scan_pending = False
            if not any(op.kind == "scan" for op in self._queue):
                self._queue.appendleft(_Op("scan"))
            self._start()

    def _start(self) -> None:
        """Start the thread if needed (caller holds _lock)."""
        self._stopping = False
        if self._scan_pending:
            self._scan_pending = False
            self._queue.appendleft(_Op("scan"))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nbguard-replica", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def _enqueue_upload(self, path: str) -> bool:
        """Queue ``path`` (caller holds _lock); False when an equal copy is already on its way."""
        op = self._queued.get(path)
        if op is not None:
            if is_blob(path):
                return False  # same bytes; keep its place ahead of the manifests that need it
            self._queue.remove(op)  # a rewritten file goes last, after the blobs written since
        current = self._current
        if current is not None and current.kind == "upload" and current.path == path and not current.cancelled:
            if is_blob(path):
                return False
            current.cancelled = True  # it may be sending the old bytes: it must not claim the new ones
        op = _Op("upload", path)
        self._queued[path] = op
        self._queue.append(op)
        return True

    # ----- waiting --------------------------------------------------------------------------------

    def pending(self) -> int:
        with self._lock:
            return len(self._queue) + (self._current is not None)

    def flush(self, timeout: float | None) -> bool:
        with self._cond:
            if (self._queue or self._scan_pending) and (self._thread is None or self._stopping):
                self._start()
            return self._cond.wait_for(lambda: not self._queue and self._current is None, timeout)

    def close(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        done = self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return done

    @property
    def running(self) -> bool:
        with self._lock:
            return self._thread is not None

    # ----- states -------------------------------------------------------------------------------

    def known_state(self, path: str) -> str | None:
        """The state this process gave ``path`` (MISSING while its delete is queued), else None."""
        with self._lock:
            known = self._states.get(path)
            return known if known is not None else MISSING if self._deleting[path] else None

    def deleting(self) -> set[str]:
        """Paths whose remote delete is still queued: the remote copy must not be shown."""
        with self._lock:
            return set(self._deleting)

    def subscribe(self, callback: Listener) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return unsubscribe

    def set_state(self, path: str, state: str, op: _Op | None = None) -> None:
        with self._emit_lock:
            with self._lock:
                if (op is not None and op.cancelled) or self._states.get(path) == state:
                    return
                self._states[path] = state
            self._emit(path, state)

    def _emit(self, path: str, state: str) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for callback in listeners:
            try:
                callback(path, state)
            except Exception as exc:  # a broken listener must not stop the copies
                self.remote.problem("listener", f"nbguard: a durability listener failed and is ignored: {exc!r}")

    # ----- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    self._thread = None
                    self._cond.notify_all()
                    return
                op = self._queue.popleft()
                if op.kind == "upload":
                    self._queued.pop(op.path, None)
                self._current = op
            try:
                self._attempt(op)
            finally:
                with self._cond:
                    self._current = None
                    self._cond.notify_all()

    def _attempt(self, op: _Op) -> None:
        """Run one job until it succeeds, is cancelled, or the thread is stopped."""
        delay = self._retry_interval
        while not op.cancelled:
            try:
                final = self._do(op)
            except Exception as exc:
                self._failed(op, exc)
                wait_for_mount = not self.remote.present()
                if not self._pause(delay, wait_for_mount):
                    self._requeue(op)
                    return
                if not wait_for_mount:
                    delay = min(delay * 2, self._max_retry_interval)
                continue
            self._succeeded(op, final)
            return

    def _pause(self, delay: float, wait_for_mount: bool) -> bool:
        """Back off before a retry; a dropped mount is polled cheaply instead. False when stopping."""
        while True:
            with self._cond:
                if self._cond.wait_for(lambda: self._stopping, self._retry_interval if wait_for_mount else delay):
                    return False
            if not wait_for_mount or self.remote.present():
                return True

    def _requeue(self, op: _Op) -> None:
        with self._cond:
            if op.cancelled or (op.kind == "upload" and op.path in self._queued):
                return  # superseded by a newer write of the same path
            self._queue.appendleft(op)
            if op.kind == "upload":
                self._queued[op.path] = op

    def _do(self, op: _Op) -> str | None:
        if op.kind == "scan":
            self._scan()
        elif op.kind == "delete":
            self.remote.ready()
            self.remote.store.delete(op.path)
        else:
            return self._upload(op)
        return None

    def _upload(self, op: _Op) -> str | None:
        """Copy one file; the state it ends in, or None when the local file is gone."""
        path = op.path
        remote = self.remote
        remote.ready()
        try:
            view = memoryview(self.local.open_blob(path))  # a memory map for LocalStore: read as sent
        except StoreError:
            if not self.local.exists(path):
                return None  # deleted or replaced meanwhile; a later write queues it again
            raise
        self.set_state(path, UPLOADING, op)
        there = next((i for i in remote.fresh_listing(folder_of(path)) if i.path == path), None)
        same = False
        if there is not None and there.size == view.nbytes:
            # A blob's name is its content hash; other files are compared before being skipped.
            same = (remote.kind == "mount" and is_blob(path)) or remote.matches(path, view)
        if not same:
            remote.store.write(path, chunks(view, self._chunk_size))
            remote.cache_put(FileInfo(path, view.nbytes, time.time()))
            if remote.kind != "mount" and not remote.matches(path, view):
                raise StoreError(f"the copy of {path} on {remote.store.url} differs from the local file: copying it again")
        return self.copied

    def _scan(self) -> None:
        self.remote.ready()
        local_files = walk(self.local)
        remote_sizes: dict[str, int] = {}
        for folder in sorted({folder_of(f.path) for f in local_files}):
            remote_sizes.update((f.path, f.size) for f in self.remote.fresh_listing(folder))
        missing = [f for f in local_files if remote_sizes.get(f.path) != f.size]
        missing.sort(key=lambda f: (upload_rank(f.path), f.mtime, f.path))
        with self._emit_lock:
            with self._cond:
                # Blobs go first: a manifest queued anywhere may need them (even one this session
                # writes again: same name, same bytes). Other files go last, after every blob queued
                # so far, which includes the blobs of a manifest a write is committing right now.
                front: list[_Op] = []
                back: list[_Op] = []
                for f in missing:
                    if f.path not in self._queued and not self._deleting[f.path]:
                        (front if is_blob(f.path) else back).append(_Op("upload", f.path))
                self._queue.extendleft(reversed(front))
                self._queue.extend(back)
                for op in front + back:
                    self._queued[op.path] = op
                    self._states[op.path] = LOCAL
            for op in front + back:
                self._emit(op.path, LOCAL)

    def _succeeded(self, op: _Op, final: str | None) -> None:
        with self._emit_lock:
            with self._cond:
                self.last_error = None
                if op.kind == "delete":
                    self._deleting[op.path] -= 1
                    if self._deleting[op.path] <= 0:
                        del self._deleting[op.path]
                    self.remote.cache_forget(op.path)
                elif op.kind == "upload" and final is None and not op.cancelled:
                    self._states.pop(op.path, None)
            if op.kind == "upload" and final is not None:
                self.set_state(op.path, final, op)
        waiting = self.pending() - 1
        if self.remote.solved("mount"):
            self.remote.say(self.remote.back_message(waiting))
        if self.remote.solved("copy"):
            self.remote.say(f"nbguard: copying to {self.remote.store.url} works again ({waiting} waiting).")

    def _failed(self, op: _Op, exc: BaseException) -> None:
        """Record a failure and report it once per outage."""
        what = {"scan": "checking what is missing on", "delete": f"deleting {op.path} from"}.get(
            op.kind, f"copying {op.path} to"
        )
        message = f"{what} {self.remote.store.url} failed: {exc or type(exc).__name__}"
        with self._lock:
            self.last_error = message
        if op.kind == "upload":
            self.set_state(op.path, FAILED, op)
        if self.remote.is_drop(exc):
            self.remote.problem("mount", self.remote.mount_message(exc))
        else:
            self.remote.problem(
                "copy",
                f"nbguard: {message}. Snapshots are kept on this machine's disk ({self.local.url}) "
                "and copied when it works again (retrying in the background).",
            )
