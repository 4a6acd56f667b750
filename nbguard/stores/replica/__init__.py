"""A store that saves on this machine's disk first and copies to a durable place in the background.

``ReplicatedStore(local, remote)`` is itself a Store. ``write`` returns once the file is committed
in ``local``; one uploader thread then copies files to ``remote`` in the order they were written
(blobs before their manifest, so the remote never shows a manifest before its blobs). Remote
trouble -- a dropped Drive mount, rate limits, a full quota -- never reaches the caller of
``write``: it is retried with backoff and reported once through ``report``.

Durability of one path, from ``state(path)``:

    local                  committed on this machine, not copied yet
    uploading              being copied or checked now
    verified               the remote copy was checked equal to the local file (md5 or read-back)
    written, sync pending  written into a mounted Drive folder: on the mount, not provably in the cloud
    on remote, unchecked   the same size on both sides, found there, not checked by this process
    remote only            only on the remote (a fresh runtime); reading it downloads it
    failed                 the last copy attempt failed (see ``last_error``); it is retried
    missing                on neither side, or deleted

The parts: ``replica_uploader`` (the copying thread and the states), ``replica_remote`` (the remote
as seen from here: mount checks, cached listings, verification, reports).
"""

from __future__ import annotations

import builtins
import sys
from collections.abc import Callable, Iterable

from ...errors import StoreError, UsageError
from ..base import BlobBuffer, Buffer, FileInfo, ListsTempFiles, Progress, Store
from ..filereader import FileReader
from ..local import LocalStore
from .remote import RemoteKind, RemoteSide, Report, chunks, folder_of, infer_remote_kind
from .uploader import (
    FAILED,
    LOCAL,
    MISSING,
    REMOTE_ONLY,
    STATES,
    SYNC_PENDING,
    UNCHECKED,
    UPLOADING,
    VERIFIED,
    Listener,
    Uploader,
)

__all__ = [
    "ReplicatedStore",
    "STATES",
    "LOCAL",
    "UPLOADING",
    "VERIFIED",
    "SYNC_PENDING",
    "UNCHECKED",
    "REMOTE_ONLY",
    "FAILED",
    "MISSING",
]


def _print_report(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class ReplicatedStore:
    """A local store replicated to a remote one by a background uploader (see the module doc).

    ``remote_kind`` is inferred when not given: a LocalStore under /content/drive is a 'mount', a
    store with an ``md5(path) -> str | None`` method (the Drive API store) is 'api', anything else
    'other' (checked by reading the copy back). ``report`` gets one plain message per outage and
    one when it is over (default: printed to stderr). With ``resync=True`` the uploader's first
    job, once a write or ``resync()`` starts it, is the ``resync`` scan, so an upload cut short by a
    kernel restart is finished, blobs ahead of any manifest.
    The constructor starts no thread and touches neither store.
    """

    def __init__(
        self,
        local: LocalStore,
        remote: Store,
        *,
        remote_kind: RemoteKind | None = None,
        report: Report | None = None,
        resync: bool = True,
        retry_interval: float = 2.0,
        max_retry_interval: float = 60.0,
        listing_ttl: float = 5.0,
        chunk_size: int = 8 << 20,
    ):
        if remote_kind not in (None, "mount", "api", "other"):
            raise UsageError(f"remote_kind must be 'mount', 'api' or 'other', not {remote_kind!r}")
        if chunk_size <= 0 or retry_interval <= 0 or max_retry_interval < retry_interval:
            raise UsageError("chunk_size and retry_interval must be positive, max_retry_interval >= retry_interval")
        self.local = local
        self.remote = remote
        self.remote_kind: RemoteKind = remote_kind or infer_remote_kind(remote)
        self.url = remote.url
        self._chunk_size = chunk_size
        self._remote = RemoteSide(remote, self.remote_kind, local.url, report or _print_report, listing_ttl, chunk_size)
        self._uploader = Uploader(
            local,
            self._remote,
            scan_first=resync,
            retry_interval=retry_interval,
            max_retry_interval=max_retry_interval,
            chunk_size=chunk_size,
        )

    def __repr__(self) -> str:
        return f"ReplicatedStore({self.local!r} -> {self.remote!r}, {self.remote_kind})"

    # ----- the Store protocol -------------------------------------------------------------------

    def write(self, path: str, chunks: Iterable[Buffer], progress: Progress | None = None) -> None:
        """Write to the local store (errors there raise), then queue the copy to the remote."""
        self.local.write(path, chunks, progress)
        self._uploader.upload(path)

    def write_with_header(self, header_size: int, pieces: Iterable[Buffer],
                          finish: Callable[[], tuple[str, bytes]], progress: Progress | None = None) -> str:
        """A blob streamed into the local store (see ``LocalStore.write_with_header``), then queued."""
        path = self.local.write_with_header(header_size, pieces, finish, progress)
        self._uploader.upload(path)
        return path

    def open_reader(self, path: str) -> FileReader:
        """Positional reads of the local copy (a remote-only file is downloaded into it first)."""
        if not self.local.exists(path):
            self.open_blob(path)
        return self.local.open_reader(path)

    def read(self, path: str) -> bytes:
        """The local copy if there is one, else the remote's (not kept locally)."""
        if self.local.exists(path):
            try:
                return self.local.read(path)
            except StoreError:
                if self.local.exists(path):
                    raise
        self._check_not_deleted(path)
        return self._remote.fetch(path, lambda: self.remote.read(path))

    def open_blob(self, path: str, progress: Progress | None = None) -> BlobBuffer:
        """The local copy; a remote-only file is first downloaded into the local store."""
        if self.local.exists(path):
            try:
                return self.local.open_blob(path, progress)
            except StoreError:
                if self.local.exists(path):
                    raise
        self._check_not_deleted(path)
        data = self._remote.fetch(path, lambda: self.remote.open_blob(path))
        self.local.write(path, chunks(memoryview(data), self._chunk_size), progress)
        del data
        self._uploader.set_state(path, self._uploader.copied)
        return self.local.open_blob(path)

    def list(self, folder: str) -> builtins.list[FileInfo]:
        """Local and remote files (the remote listing cached ``listing_ttl`` s; local only if it fails)."""
        local = self.local.list(folder)
        remote = self._remote.listing(folder)
        hidden = self._uploader.deleting()
        merged = {info.path: info for info in remote if info.path not in hidden}
        merged.update((info.path, info) for info in local)
        return list(merged.values())

    def folders(self, folder: str) -> builtins.list[str]:
        """Sub-folders on either side."""
        return sorted(set(self.local.folders(folder)).union(self._remote.folders(folder)))

    def exists(self, path: str) -> bool:
        """On either side (a remote that cannot be reached counts as "no")."""
        if self.local.exists(path):
            return True
        return path not in self._uploader.deleting() and self._remote.exists(path)

    def delete(self, path: str) -> None:
        """Delete locally now and on the remote in turn; a queued upload of ``path`` is dropped."""
        self.local.delete(path)
        self._uploader.delete(path)

    def temp_files(self, folder: str) -> builtins.list[FileInfo]:
        """Leftovers of interrupted writes on either side (for ``Catalog.gc``; delete removes both)."""
        found = {f.path: f for f in self._remote.temp_files(folder)}
        if isinstance(self.local, ListsTempFiles):
            found.update((f.path, f) for f in self.local.temp_files(folder))
        return list(found.values())

    # ----- durability -----------------------------------------------------------------------------

    def state(self, path: str) -> str:
        """How durable ``path`` is: one of ``STATES`` (see the module doc)."""
        known = self._uploader.known_state(path)
        if known is not None:
            return known
        folder = folder_of(path)
        remote = next((i for i in self._remote.listing(folder) if i.path == path), None)
        local = next((i for i in self.local.list(folder) if i.path == path), None)
        if local is None:
            return REMOTE_ONLY if remote is not None else MISSING
        if remote is None or remote.size != local.size:
            return LOCAL
        return SYNC_PENDING if self.remote_kind == "mount" else UNCHECKED

    def on_change(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(path, state)`` on every state change; returns an unsubscribe function.

        It runs on the thread that made the change (the uploader for copies, the caller for
        write/delete/open_blob) while other state changes wait: keep it cheap, never block in it.
        """
        return self._uploader.subscribe(callback)

    @property
    def last_error(self) -> str | None:
        """The message of the last failed remote operation; None once one succeeds after it."""
        return self._uploader.last_error

    def pending(self) -> int:
        """Uploads, deletes and scans not finished yet (the one in flight included)."""
        return self._uploader.pending()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued reached the remote; False if ``timeout`` s passed first."""
        return self._uploader.flush(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush for up to ``timeout`` s, then stop the uploader after its current file.

        What is left stays queued (and on the local disk): a later write, ``flush`` or ``resync``
        starts the uploader again. Returns whether everything was copied.
        """
        return self._uploader.close(timeout)

    def resync(self) -> None:
        """Queue the local files missing on the remote (or of another size there).

        Found blobs go to the head of the queue, then the other files to its tail: manifests in
        time order, pins last, so no manifest overtakes a blob it may need. The scan itself runs
        next on the uploader thread and is retried like any copy; ``flush()`` waits for it.
        """
        self._uploader.resync()

    def _check_not_deleted(self, path: str) -> None:
        if path in self._uploader.deleting():
            raise StoreError(f"{path} was deleted")
