"""The remote half of a ReplicatedStore: its kind, whether a mount is there, cached listings that
tolerate failure, checking a copy, and reporting each outage once."""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import threading
import time
from collections.abc import Callable, Iterator
from typing import Literal, Protocol, TypeVar

import xxhash

from ...errors import StoreError
from ..base import FileInfo, KnowsChecksums, ListsTempFiles, Store
from ..local import LocalStore

RemoteKind = Literal["mount", "api", "other"]
Report = Callable[[str], None]
T = TypeVar("T")

COLAB_DRIVE = "/content/drive"
REMOUNT_FIX = "from google.colab import drive; drive.mount('/content/drive', force_remount=True)"

# What a dropped FUSE mount answers while its mount point is still there; a vanished mount is
# recognised by its missing anchor folder instead (ENOENT alone may just be a missing file).
_MOUNT_ERRNOS = frozenset({errno.ENOTCONN, errno.EIO, errno.ESTALE})


def infer_remote_kind(remote: Store) -> RemoteKind:
    """'mount' for a folder under Colab's /content/drive, 'api' for a store with ``md5(path)``."""
    if isinstance(remote, LocalStore) and (remote.root == COLAB_DRIVE or remote.root.startswith(COLAB_DRIVE + "/")):
        return "mount"
    if isinstance(remote, KnowsChecksums):
        return "api"
    return "other"


def mount_anchor(remote: Store) -> str | None:
    """The folder whose presence means "the mount is there".

    Under /content/drive it is the mount's top folder (``MyDrive``), which only exists while Drive is
    mounted; elsewhere the store root, or its nearest existing parent when the root is not made yet.
    Checking it before each copy keeps nbguard from recreating the store folder on the VM's own disk
    underneath a dropped mount (which would also make the remount fail: "Mountpoint must not already
    contain files").
    """
    if not isinstance(remote, LocalStore):
        return None
    root = remote.root
    if root.startswith(COLAB_DRIVE + "/"):
        top = root[len(COLAB_DRIVE) + 1:].split("/", 1)[0]
        return f"{COLAB_DRIVE}/{top}"
    path = root
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def os_errno(exc: BaseException) -> int | None:
    """The errno of the first OSError in an exception's cause/context chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current.errno
        current = current.__cause__ or current.__context__
    return None


def is_blob(path: str) -> bool:
    """Blobs are content-addressed: the same path always holds the same bytes."""
    return path.startswith("blobs/")


def upload_rank(path: str) -> int:
    """Order of a restart's uploads: blobs, other files, manifests (the commit points), pins."""
    parts = path.split("/")
    if parts[0] == "blobs":
        return 0
    if len(parts) == 4 and parts[0] == "runs" and parts[2] == "snapshots":
        return 2
    if len(parts) == 4 and parts[0] == "runs" and parts[2] == "pins":
        return 3
    return 1


def folder_of(path: str) -> str:
    return posixpath.dirname(path)


def chunks(buffer: memoryview, size: int) -> Iterator[memoryview]:
    """Slices of a buffer (a memory map stays on disk until each slice is consumed)."""
    for start in range(0, buffer.nbytes, size):
        yield buffer[start:start + size]


class _Hasher(Protocol):
    def update(self, data: memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


def _digest(hasher: _Hasher, buffer: memoryview, size: int) -> str:
    for part in chunks(buffer, size):
        hasher.update(part)
    return hasher.hexdigest()


def walk(store: Store, folder: str = "") -> list[FileInfo]:
    """Every finished file of a store below ``folder``."""
    out = list(store.list(folder))
    for name in store.folders(folder):
        out.extend(walk(store, f"{folder}/{name}" if folder else name))
    return out


class RemoteSide:
    """A remote store as the replica sees it. Thread-safe; listing methods never raise."""

    def __init__(self, store: Store, kind: RemoteKind, local_url: str, report: Report, listing_ttl: float, chunk_size: int):
        self.store = store
        self.kind = kind
        self.anchor = mount_anchor(store) if kind == "mount" else None
        self._local_url = local_url
        self._report = report
        self._ttl = listing_ttl
        self._chunk_size = chunk_size
        self._lock = threading.Lock()
        self._listings: dict[str, tuple[float, list[FileInfo] | None]] = {}  # None: the listing failed
        self._folders: dict[str, tuple[float, list[str] | None]] = {}
        self._problems: set[str] = set()

    # ----- the mount ----------------------------------------------------------------------------

    def present(self) -> bool:
        """False while a mount's anchor folder is missing (or its FUSE endpoint disconnected)."""
        return self.anchor is None or os.path.isdir(self.anchor)

    def ready(self) -> None:
        """Raise before touching a dropped mount: LocalStore.write would recreate the folder on the
        VM's own disk underneath it."""
        if not self.present():
            raise StoreError(f"the mount {self.anchor} is not there") from FileNotFoundError(
                errno.ENOENT, os.strerror(errno.ENOENT), self.anchor
            )

    def is_drop(self, exc: BaseException) -> bool:
        return self.kind == "mount" and (not self.present() or os_errno(exc) in _MOUNT_ERRNOS)

    def mount_message(self, exc: BaseException) -> str:
        code = os_errno(exc)
        reason = "the folder is gone" if not self.present() else os.strerror(code) if code else str(exc)
        return (
            f"nbguard: Google Drive at {self.anchor or self.store.url} is not reachable ({reason}): the mount "
            f"dropped. Snapshots are kept on this machine's disk ({self._local_url}) and copied to Drive by "
            "themselves once it is back; a runtime reset before then loses them. "
            f"Reconnect Drive in a cell: {REMOUNT_FIX}"
        )

    # ----- listings -----------------------------------------------------------------------------

    def listing(self, folder: str) -> list[FileInfo]:
        """The folder's files, cached; [] (reported once) while the remote cannot be listed."""
        now = time.monotonic()
        with self._lock:
            hit = self._listings.get(folder)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1] or []
        try:
            return self.fresh_listing(folder)
        except Exception as exc:
            with self._lock:
                self._listings[folder] = (now, None)  # don't hammer a failing remote on every call
            self.listing_failed(exc)
            return []

    def fresh_listing(self, folder: str) -> list[FileInfo]:
        """The folder's files now (errors raise); refreshes the cache."""
        self.ready()
        files = self.store.list(folder)
        with self._lock:
            self._listings[folder] = (time.monotonic(), list(files))
        self.solved("list")  # not "mount": listing may work while writes still fail; a copy closes that
        return files

    def folders(self, folder: str) -> list[str]:
        """Sub-folder names, cached; [] while the remote cannot be listed."""
        now = time.monotonic()
        with self._lock:
            hit = self._folders.get(folder)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1] or []
        names: list[str] | None
        try:
            self.ready()
            names = self.store.folders(folder)
        except Exception as exc:
            self.listing_failed(exc)
            names = None
        with self._lock:
            self._folders[folder] = (now, names)
        return names or []

    def exists(self, path: str) -> bool:
        """Whether the remote has ``path``; False while it cannot be reached."""
        try:
            self.ready()
            return self.store.exists(path)
        except Exception as exc:
            self.listing_failed(exc)
            return False

    def temp_files(self, folder: str) -> list[FileInfo]:
        """The remote's leftovers of interrupted writes, where it can tell; [] on failure."""
        if not isinstance(self.store, ListsTempFiles):
            return []
        try:
            self.ready()
            return list(self.store.temp_files(folder))
        except Exception as exc:
            self.listing_failed(exc)
            return []

    def cache_put(self, info: FileInfo) -> None:
        """Record a file the replica just copied, without listing again."""
        self._cache_edit(info.path, info)

    def cache_forget(self, path: str) -> None:
        self._cache_edit(path, None)

    def _cache_edit(self, path: str, info: FileInfo | None) -> None:
        folder = folder_of(path)
        with self._lock:
            hit = self._listings.get(folder)
            if hit is not None and hit[1] is not None:
                files = [f for f in hit[1] if f.path != path] + ([info] if info else [])
                self._listings[folder] = (hit[0], files)

    # ----- reading and checking -----------------------------------------------------------------

    def fetch(self, path: str, read: Callable[[], T]) -> T:
        """Read from the remote; a dropped mount raises with the fix."""
        try:
            self.ready()
            return read()
        except StoreError as exc:
            if self.is_drop(exc):
                raise StoreError(
                    f"{path} is only on the Google Drive mount, which is not reachable: "
                    f"reconnect it ({REMOUNT_FIX}) and try again"
                ) from exc
            raise

    def matches(self, path: str, local: memoryview) -> bool:
        """Whether the remote copy has the local bytes: Drive's md5 when offered, else a read-back."""
        if isinstance(self.store, KnowsChecksums) and self.kind != "mount":
            remote_md5 = self.store.md5(path)
            if remote_md5:
                return str(remote_md5).lower() == _digest(hashlib.md5(), local, self._chunk_size)
        remote = memoryview(self.store.open_blob(path))
        size = self._chunk_size
        return remote.nbytes == local.nbytes and _digest(xxhash.xxh3_128(), remote, size) == _digest(
            xxhash.xxh3_128(), local, size
        )

    # ----- reports: once per outage ---------------------------------------------------------------

    def listing_failed(self, exc: BaseException) -> None:
        if self.is_drop(exc):
            self.problem("mount", self.mount_message(exc))
        else:
            self.problem(
                "list",
                f"nbguard: listing {self.store.url} failed ({exc}); "
                "showing only the snapshots on this machine's disk until it works again.",
            )

    def back_message(self, waiting: int) -> str:
        return f"nbguard: the Google Drive mount is back; copying resumed ({waiting} waiting)."

    def problem(self, key: str, message: str) -> None:
        """Report ``message`` unless the problem ``key`` is already reported and not solved since."""
        with self._lock:
            if key in self._problems:
                return
            self._problems.add(key)
        self.say(message)

    def solved(self, key: str) -> bool:
        """Mark problem ``key`` solved; whether it was open."""
        with self._lock:
            if key not in self._problems:
                return False
            self._problems.discard(key)
            return True

    def say(self, message: str) -> None:
        try:
            self._report(message)
        except Exception:  # reporting must never stop the copies
            pass
