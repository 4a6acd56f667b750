"""The storage contract: ``Store`` and the optional capabilities a backend may declare.

A store is a flat namespace of files under one root, addressed by relative '/'-separated paths.
It offers a handful of synchronous methods; nbguard keeps its own commit protocol on top
(blobs first, manifest last) and relies on nothing but this contract:

* ``write`` is atomic and durable: a reader sees the whole file or nothing, and after it returns
  the bytes survive a crash of this process (fsync for local disks).
* ``list`` never shows a file that ``write`` has not finished.
* ``delete`` of a missing file is not an error.

Fast paths and extras (an atomic rename, a direct-I/O reader, a streamed blob write, leftover
temporary files, an uploader's state) are declared as the protocols below; callers test them with
``isinstance(store, Renames)``, never by probing attribute names.
"""

from __future__ import annotations

import builtins
import errno
import mmap
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..errors import StoreError

Buffer = bytes | bytearray | memoryview
BlobBuffer = Buffer | mmap.mmap  # what open_blob gives: a private memory map where possible
Progress = Callable[[int], None]
EventHook = Callable[[str, str], None]




@dataclass(frozen=True)
class FileInfo:
    """One file of a store: its path, size in bytes and modification time (unix seconds)."""

    path: str
    size: int
    mtime: float



@runtime_checkable
class Store(Protocol):
    """The storage contract every backend implements."""

    url: str

    def list(self, folder: str) -> builtins.list[FileInfo]:
        """Files directly inside ``folder`` ('' is the root); [] when the folder does not exist."""

    def folders(self, folder: str) -> builtins.list[str]:
        """Names of the sub-folders directly inside ``folder``."""

    def read(self, path: str) -> bytes:
        """The whole content of a (small) file."""

    def open_blob(self, path: str, progress: Progress | None = None) -> BlobBuffer:
        """A writable private buffer over a file (a copy-on-write memory map where possible):
        tensors built on it may be modified without changing the file."""

    def write(self, path: str, chunks: Iterable[Buffer], progress: Progress | None = None) -> None:
        """Write a file atomically and durably; an existing file of that path is replaced."""

    def delete(self, path: str) -> None:
        """Remove a file; a missing file is fine."""

    def exists(self, path: str) -> bool:
        """Whether a finished file exists at ``path``."""


def check_relative(path: str) -> str:
    """Reject paths that could leave the store root (absolute, '..', backslashes, empty parts)."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path or "\0" in path:
        raise StoreError(f"refusing unsafe store path {path!r}")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise StoreError(f"refusing unsafe store path {path!r}")
    return path


def describe_os_error(exc: OSError, where: str) -> str:
    """One plain sentence for an OS error during storage, with what to do."""
    hints = {
        errno.ENOSPC: "the disk is full: free some space or choose another folder",
        errno.EDQUOT: "the disk quota is exhausted: free some space or choose another folder",
        errno.EACCES: "permission denied: choose a folder you can write to",
        errno.EPERM: "permission denied: choose a folder you can write to",
        errno.EROFS: "the folder is read-only: choose a folder you can write to",
        errno.ENOENT: "the folder has disappeared (a dropped mount?): reconnect it or choose another folder",
        errno.ENOTCONN: "the mount is disconnected: remount it (Colab: drive.mount('/content/drive', force_remount=True))",
        errno.EIO: "an I/O error occurred: check the disk or mount",
    }
    hint = hints.get(exc.errno or 0, exc.strerror or str(exc))  # errno None or 0: no hint
    return f"saving to {where} failed: {hint}"


# --- optional capabilities: declared by a backend's methods, tested with isinstance ----------------
@runtime_checkable
class Renames(Protocol):
    """Moves a file atomically (replacing the target); StoreError if the source is missing."""

    def rename(self, path: str, new_path: str) -> None: ...


@runtime_checkable
class ListsTempFiles(Protocol):
    """Lists the leftovers of interrupted writes in a folder (``list`` never shows them)."""

    def temp_files(self, folder: str) -> builtins.list[FileInfo]: ...


@runtime_checkable
class OpensReaders(Protocol):
    """Reads a file by positional reads into caller-owned memory (no whole-file buffer)."""

    def open_reader(self, path: str) -> Any: ...


@runtime_checkable
class WritesWithHeader(Protocol):
    """Streams a file whose header depends on its data (written last, at the front)."""

    def write_with_header(self, header_size: int, pieces: Iterable[Buffer],
                          finish: Callable[[], tuple[str, bytes]], progress: Progress | None = None) -> str: ...


@runtime_checkable
class KnowsChecksums(Protocol):
    """Reports a file's MD5 as the remote service computed it (None where it cannot)."""

    def md5(self, path: str) -> str | None: ...


@runtime_checkable
class HasQuota(Protocol):
    """Reports (bytes used, bytes total; 0 = unlimited) of the account behind the store."""

    def quota(self) -> tuple[int, int]: ...


@runtime_checkable
class Staged(Protocol):
    """Writes land locally first and reach ``remote`` in the background (a replicated store)."""

    remote: Store
    remote_kind: str
    last_error: str | None

    def state(self, path: str) -> str: ...

    def flush(self, timeout: float | None = None) -> bool: ...

    def pending(self) -> int: ...
