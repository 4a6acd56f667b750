"""Opening a store from a location: a folder path, ``memory://NAME``, ``gdrive://FOLDER``, a URL
of a scheme registered with ``register_scheme`` or by a package's ``nbguard.stores`` entry point
(as torchsnapshot's storage plugins), else any fsspec URL.

The one process-wide state of the stores lives here: stores reached by the same location must be
the same object within a process (a magic's ``--dir`` and the panel name ``memory://x`` apart; a
staged Drive location has one uploader thread per process).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import UsageError
from .base import Store
from .fsspec_store import FsspecStore
from .local import LocalStore
from .memory import MemoryStore

if TYPE_CHECKING:
    from .replica.remote import RemoteKind

Opener = Callable[[str], Store]
_SCHEMES: dict[str, Opener] = {}


def register_scheme(scheme: str, opener: Opener) -> None:
    """Open ``scheme://...`` locations with ``opener(location)`` (replaces an earlier opener).

    Packages can do the same without being imported first, through an entry point in the group
    ``nbguard.stores`` whose name is the scheme and whose object is the opener."""
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise UsageError(f"{scheme!r} is not a URL scheme (lower-case letters, digits, '+', '.', '-')")
    _SCHEMES[scheme] = opener


def open_store(location: str | os.PathLike[str] | Store) -> Store:
    """A store for a folder path, a URL, or an existing store object.

    ``gdrive://FOLDER`` opens Google Drive through its API (needs ``pip install 'nbguard[drive]'``);
    ``memory://NAME`` an in-memory store (the same one for the same name in this process); a
    registered scheme its opener; any other ``scheme://`` goes to fsspec.
    """
    if isinstance(location, Store):
        return location
    text = os.fspath(location)
    if not isinstance(text, str) or not text.strip():
        raise UsageError("the store location is empty: pass a folder path or a URL such as gdrive://nbguard")
    if "://" not in text:
        path = os.path.abspath(os.path.expanduser(text))
        if any(path == m or path.startswith(m + os.sep) for m in mount_prefixes()):
            return SHARED.staged(path, lambda: LocalStore(path), "mount")
        return LocalStore(path)
    scheme = text.split("://", 1)[0].lower()
    opener = _SCHEMES.get(scheme) or _entry_point(scheme)
    if opener is not None:
        return opener(text)
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as exc:
        raise UsageError(
            f"unknown store URL scheme {scheme!r} in {text!r}: use a folder path, memory://NAME, "
            "gdrive://FOLDER, or an fsspec URL whose package is installed"
        ) from exc
    return FsspecStore(text)


def _entry_point(scheme: str) -> Opener | None:
    from importlib.metadata import entry_points

    for point in entry_points(group="nbguard.stores"):
        if point.name == scheme:
            opener: Opener = point.load()
            register_scheme(scheme, opener)
            return opener
    return None


def _open_file(location: str) -> Store:
    return LocalStore(location.split("://", 1)[1])


def _open_memory(location: str) -> Store:
    return SHARED.memory(location.split("://", 1)[1] or "memory")


def _open_drive(location: str) -> Store:
    try:
        from .drive import open_drive_store
    except ImportError as exc:
        raise UsageError("Google Drive support needs extra packages: pip install 'nbguard[drive]'") from exc
    return SHARED.staged(location, lambda: open_drive_store(location), "api")


for _scheme, _opener in (("file", _open_file), ("memory", _open_memory), ("gdrive", _open_drive), ("drive", _open_drive)):
    register_scheme(_scheme, _opener)


def mount_prefixes() -> list[str]:
    """Folders that are network mounts, where a write returning does not mean the bytes are safe:
    Colab's Drive mount, plus any in ``NBGUARD_MOUNT_PREFIXES`` (os.pathsep-separated)."""
    extra = [p for p in os.environ.get("NBGUARD_MOUNT_PREFIXES", "").split(os.pathsep) if p]
    return [os.path.abspath(p) for p in ["/content/drive", *extra]]


def staging_folder(location: str) -> str:
    """The local folder where saves to ``location`` land first (``NBGUARD_STAGING`` overrides the base)."""
    base = os.environ.get("NBGUARD_STAGING") or os.path.join(os.path.expanduser("~"), ".cache", "nbguard", "staging")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", location).strip("-")[-60:]
    return os.path.join(base, f"{name}-{hashlib.sha1(location.encode()).hexdigest()[:8]}")


class SharedStores:
    """Stores that one location must reach as one object within this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.staged_stores: dict[str, Store] = {}
        self.memory_stores: dict[str, MemoryStore] = {}

    def staged(self, location: str, remote: Callable[[], Store], kind: RemoteKind) -> Store:
        """The replicated store for ``location`` (one uploader thread per location and process)."""
        with self._lock:
            store = self.staged_stores.get(location)
            if store is None:
                from .replica import ReplicatedStore

                store = ReplicatedStore(LocalStore(staging_folder(location)), remote(), remote_kind=kind)
                store.resync()  # finish uploads an earlier session (killed mid-upload) left behind
                self.staged_stores[location] = store
            return store

    def memory(self, name: str) -> MemoryStore:
        """The memory store of this name: the same for a magic's ``--dir`` and the panel, never across
        processes or different names."""
        with self._lock:
            if name not in self.memory_stores:
                self.memory_stores[name] = MemoryStore(name)
            return self.memory_stores[name]


SHARED = SharedStores()
