"""Stores: the folders snapshots live in.

A store is a flat namespace of files under one root, addressed by relative '/'-separated paths.
It offers a handful of synchronous methods; nbguard keeps its own commit protocol on top
(blobs first, manifest last) and relies on nothing but this contract:

* ``write`` is atomic and durable: a reader sees the whole file or nothing, and after it returns
  the bytes survive a crash of this process (fsync for local disks).
* ``list`` never shows a file that ``write`` has not finished.
* ``delete`` of a missing file is not an error.

``LocalStore`` (a local or mounted folder), ``MemoryStore`` (an instance-scoped test and teaching
double) and ``FsspecStore`` (any fsspec URL) ship here; Google Drive lives in ``nbguard.drive``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import mmap
import os
import posixpath
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from . import directio
from .errors import StoreError, UsageError
from .owner import TEMP_PREFIX, temp_name

Buffer = bytes | bytearray | memoryview
Progress = Callable[[int], None]


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

    def list(self, folder: str) -> list[FileInfo]:
        """Files directly inside ``folder`` ('' is the root); [] when the folder does not exist."""

    def folders(self, folder: str) -> list[str]:
        """Names of the sub-folders directly inside ``folder``."""

    def read(self, path: str) -> bytes:
        """The whole content of a (small) file."""

    def open_blob(self, path: str, progress: Progress | None = None) -> Buffer:
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
    hint = hints.get(exc.errno, exc.strerror or str(exc))
    return f"saving to {where} failed: {hint}"


EventHook = Callable[[str, str], None]


class LocalStore:
    """A folder on the local disk or on a mounted drive (Colab's /content/drive).

    ``on_event`` (also a settable attribute) is a seam for tracing and crash tests: when set, it is
    called as ``on_event(kind, path)`` right before each file-system operation of ``write`` and
    ``delete``, with ``path`` the store path being written or deleted and ``kind`` one of 'create'
    (the temporary file), 'write' (each ``os.write``), 'fsync', 'rename', 'fsync-dir' and 'delete'.
    An exception it raises acts as if that operation had failed. None (the default) costs nothing.
    """

    def __init__(self, root: str | os.PathLike[str], on_event: EventHook | None = None):
        self.root = os.path.abspath(os.fspath(root))
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise UsageError(
                f"{self.root} is a file, not a folder: pass a folder for snapshots "
                "(it is created if it does not exist)"
            )
        self.url = self.root
        self.on_event = on_event

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    def _abs(self, path: str, *, leaf: str = "") -> str:
        """The full path of a store path whose folders inside the store are real folders, never links,
        so nothing is read, written or deleted outside the store. ``leaf`` 'file' or 'folder': the
        path itself, if it exists, must be a regular file or a real folder too."""
        parts = check_relative(path).split("/")
        full = self.root
        for i, part in enumerate(parts):
            full = os.path.join(full, part)
            last = i == len(parts) - 1
            if last and not leaf:
                break
            try:
                mode = os.lstat(full).st_mode
            except FileNotFoundError:
                return os.path.join(self.root, *parts)
            except OSError:
                break  # reported by the operation itself, with what to do
            where = "/".join(parts[: i + 1])
            if stat.S_ISLNK(mode):
                raise StoreError(f"refusing to go through the symbolic link {where} inside the store {self.root}: "
                                 "nbguard never reads, writes or deletes through links; replace it with a real "
                                 "folder or file")
            if (not last or leaf == "folder") and not stat.S_ISDIR(mode):
                raise StoreError(f"{where} inside the store {self.root} should be a folder: move it away")
            if last and leaf == "file" and not stat.S_ISREG(mode):
                raise StoreError(f"{where} inside the store {self.root} is not a regular file (a FIFO, device or "
                                 "socket?): nbguard refuses to touch it; remove it")
        return full

    def _folder(self, folder: str) -> str:
        return self.root if folder == "" else self._abs(folder, leaf="folder")

    def list(self, folder: str) -> list[FileInfo]:
        base = self._folder(folder)
        try:
            entries = list(os.scandir(base))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise StoreError(describe_os_error(exc, base)) from exc
        infos = []
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            infos.append(FileInfo(posixpath.join(folder, entry.name) if folder else entry.name, st.st_size, st.st_mtime))
        return infos

    def temp_files(self, folder: str) -> list[FileInfo]:
        """Leftovers of interrupted writes in ``folder`` (for gc)."""
        base = self._folder(folder)
        try:
            entries = list(os.scandir(base))
        except OSError:
            return []
        out = []
        for entry in entries:
            try:  # a concurrent save may rename or remove it at any moment
                if not entry.name.startswith(TEMP_PREFIX) or not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            out.append(FileInfo(posixpath.join(folder, entry.name) if folder else entry.name, st.st_size, st.st_mtime))
        return out

    def folders(self, folder: str) -> list[str]:
        base = self._folder(folder)
        try:
            return sorted(e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise StoreError(describe_os_error(exc, base)) from exc

    def read(self, path: str) -> bytes:
        full = self._abs(path, leaf="file")
        try:
            with open(directio.open_regular(full), "rb") as f:
                return f.read()
        except FileNotFoundError as exc:
            raise StoreError(f"{path} is missing from {self.root}") from exc
        except OSError as exc:
            raise StoreError(f"reading {full} failed: {exc.strerror}") from exc

    def open_blob(self, path: str, progress: Progress | None = None) -> Buffer:
        full = self._abs(path, leaf="file")
        try:
            with open(directio.open_regular(full), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    return b""
                # A private copy-on-write map: tensors built on it are writable without touching the file.
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError as exc:
            raise StoreError(f"{path} is missing from {self.root}") from exc
        except OSError as exc:
            raise StoreError(f"reading {full} failed: {exc.strerror}") from exc
        return mapped

    def write(self, path: str, chunks: Iterable[Buffer], progress: Progress | None = None) -> None:
        full = self._abs(path)
        folder = os.path.dirname(full)
        tmp = os.path.join(folder, temp_name(os.path.basename(full)))
        event = self.on_event
        with self._removed_on_failure(tmp):
            os.makedirs(folder, exist_ok=True)
            if event is not None:
                event("create", path)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
            try:
                for chunk in chunks:
                    view = memoryview(chunk).cast("B")
                    while view:
                        if event is not None:
                            event("write", path)
                        written = os.write(fd, view)
                        view = view[written:]
                        if progress:
                            progress(written)
                if event is not None:
                    event("fsync", path)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._publish(tmp, path)

    def write_with_header(self, header_size: int, pieces: Iterable[Buffer],
                          finish: Callable[[], tuple[str, bytes]], progress: Progress | None = None) -> str:
        """Write a file whose first ``header_size`` bytes depend on the rest (a blob's header holds
        the hashes of its data, and its name the hash of the header): ``pieces`` are written after a
        reserved front, then ``finish()`` returns the file's path and front, and the file is made
        durable and moved into place as atomically as ``write``. Returns the path. The data goes
        around the page cache where the file system allows (see ``directio``)."""
        folder = self._folder("blobs")
        name = temp_name("blob")
        tmp, label = os.path.join(folder, name), f"blobs/{name}"
        event = self.on_event
        with self._removed_on_failure(tmp):
            os.makedirs(folder, exist_ok=True)
            if event is not None:
                event("create", label)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            fd = directio.open_direct(tmp, flags) if header_size % directio.BLOCK == 0 else None
            direct = fd is not None
            if fd is None:
                fd = os.open(tmp, flags, 0o644)
            try:
                on_write = (lambda: event("write", label)) if event is not None else None
                out = directio.SequentialWriter(fd, direct=direct, start=header_size, on_write=on_write)
                try:
                    for piece in pieces:
                        view = memoryview(piece).cast("B")
                        out.write(view)
                        if progress:
                            progress(len(view))
                    out.finish()
                    path, header = finish()
                    if len(header) != header_size:
                        raise ValueError(f"header of {len(header)} bytes for {header_size} reserved")
                    if on_write is not None:
                        on_write()
                    out.pwrite_block(header, 0)
                finally:
                    out.close()
                if event is not None:
                    event("fsync", label)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._publish(tmp, path)
        return path

    @contextlib.contextmanager
    def _removed_on_failure(self, tmp: str) -> Iterator[None]:
        """A failed write leaves nothing behind, and OS errors become StoreErrors that say what to do."""
        try:
            yield
        except OSError as exc:
            _remove_quietly(tmp)
            raise StoreError(describe_os_error(exc, self.root)) from exc
        except BaseException:
            _remove_quietly(tmp)
            raise

    def _publish(self, tmp: str, path: str) -> None:
        """Move a finished, fsynced temporary file into place and make the rename durable."""
        full = self._abs(path)
        folder = os.path.dirname(full)
        if os.path.dirname(tmp) != folder:
            os.makedirs(folder, exist_ok=True)  # (never re-created otherwise: a vanished mount stays vanished)
        if self.on_event is not None:
            self.on_event("rename", path)
        try:
            os.replace(tmp, full)
        except FileNotFoundError as exc:
            if os.path.isdir(folder) and not os.path.exists(tmp):
                raise StoreError(f"saving to {self.root} failed: the file being written was removed by another "
                                 "process (`nbguard gc --grace 0` while saving?); the next save tries again") from exc
            raise
        if self.on_event is not None:
            self.on_event("fsync-dir", path)
        _fsync_dir(folder)
        if os.path.dirname(tmp) != folder:
            _fsync_dir(os.path.dirname(tmp))

    def open_reader(self, path: str) -> directio.FileReader:
        """Positional, verified-as-you-go reads of one file (for restoring without a memory map)."""
        full = self._abs(path, leaf="file")
        try:
            return directio.FileReader(full)
        except FileNotFoundError as exc:
            raise StoreError(f"{path} is missing from {self.root}") from exc
        except OSError as exc:
            raise StoreError(f"reading {full} failed: {exc.strerror}") from exc

    def delete(self, path: str) -> None:
        try:
            full = self._abs(path)  # a link itself may be removed: that never reaches what it points to
            if self.on_event is not None:
                self.on_event("delete", path)
            os.remove(full)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"deleting {path} from {self.root} failed: {exc.strerror}") from exc

    def exists(self, path: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self._abs(path)).st_mode)
        except OSError:
            return False

    def rename(self, path: str, new_path: str) -> None:
        """Move a file within the store atomically (replacing ``new_path``); StoreError if it is missing."""
        full, target = self._abs(path, leaf="file"), self._abs(new_path)
        try:
            if self.on_event is not None:
                self.on_event("rename", path)
            os.replace(full, target)
        except FileNotFoundError as exc:
            raise StoreError(f"{path} is missing from {self.root}") from exc
        except OSError as exc:
            raise StoreError(f"renaming {path} in {self.root} failed: {exc.strerror}") from exc


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (FUSE mounts) refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class MemoryStore:
    """An in-memory store, scoped to this instance (for tests and teaching)."""

    def __init__(self, name: str = "memory"):
        self.url = f"memory://{name}"
        self._files: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryStore({self.url!r})"

    def list(self, folder: str) -> list[FileInfo]:
        prefix = f"{folder}/" if folder else ""
        with self._lock:
            items = list(self._files.items())
        return [
            FileInfo(path, len(data), mtime)
            for path, (data, mtime) in items
            if path.startswith(prefix) and "/" not in path[len(prefix):]
        ]

    def folders(self, folder: str) -> list[str]:
        prefix = f"{folder}/" if folder else ""
        with self._lock:
            paths = list(self._files)
        return sorted({p[len(prefix):].split("/")[0] for p in paths if p.startswith(prefix) and "/" in p[len(prefix):]})

    def read(self, path: str) -> bytes:
        check_relative(path)
        with self._lock:
            if path not in self._files:
                raise StoreError(f"{path} is missing from {self.url}")
            return self._files[path][0]

    def open_blob(self, path: str, progress: Progress | None = None) -> Buffer:
        return bytearray(self.read(path))

    def write(self, path: str, chunks: Iterable[Buffer], progress: Progress | None = None) -> None:
        check_relative(path)
        out = io.BytesIO()
        for chunk in chunks:
            out.write(chunk)
            if progress:
                progress(memoryview(chunk).nbytes)
        with self._lock:
            self._files[path] = (out.getvalue(), time.time())

    def delete(self, path: str) -> None:
        check_relative(path)
        with self._lock:
            self._files.pop(path, None)

    def exists(self, path: str) -> bool:
        check_relative(path)
        with self._lock:
            return path in self._files

    def rename(self, path: str, new_path: str) -> None:
        """Move a file atomically (replacing ``new_path``); StoreError if it is missing."""
        check_relative(path), check_relative(new_path)
        with self._lock:
            if path not in self._files:
                raise StoreError(f"{path} is missing from {self.url}")
            self._files[new_path] = self._files.pop(path)

    def corrupt(self, path: str, data: bytes) -> None:
        """Replace a file's bytes behind nbguard's back (for tests of damaged snapshots)."""
        with self._lock:
            self._files[path] = (data, time.time())


class FsspecStore:
    """A folder on any fsspec file system (``s3://``, ``gcs://``, ``memory://`` ...).

    Atomicity comes from writing under a temporary name and moving it into place; backends
    without an atomic move still never show a manifest before its blobs.
    """

    def __init__(self, url: str, **storage_options: object):
        try:
            import fsspec
        except ImportError as exc:  # pragma: no cover - fsspec is a core dependency
            raise UsageError("fsspec is needed for store URLs: pip install fsspec") from exc
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        except (ImportError, ValueError) as exc:
            raise UsageError(f"cannot open store {url!r}: {exc}") from exc
        self.root = root.rstrip("/")
        self.url = url

    def __repr__(self) -> str:
        return f"FsspecStore({self.url!r})"

    def _abs(self, path: str) -> str:
        return f"{self.root}/{check_relative(path)}"

    def _folder(self, folder: str) -> str:
        return self.root if folder == "" else self._abs(folder)

    def _ls(self, folder: str) -> list[dict]:
        try:
            return self.fs.ls(self._folder(folder), detail=True)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"listing {self.url}/{folder} failed: {exc}") from exc

    def list(self, folder: str) -> list[FileInfo]:
        out = []
        for entry in self._ls(folder):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") != "file" or name.startswith(TEMP_PREFIX):
                continue
            mtime = entry.get("mtime") or entry.get("created") or 0.0
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            out.append(FileInfo(posixpath.join(folder, name) if folder else name, int(entry.get("size") or 0), float(mtime)))
        return out

    def folders(self, folder: str) -> list[str]:
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self._ls(folder) if e.get("type") == "directory"
        )

    def temp_files(self, folder: str) -> list[FileInfo]:
        """Leftovers of interrupted writes in ``folder`` (for gc)."""
        out = []
        for entry in self._ls(folder):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") == "file" and name.startswith(TEMP_PREFIX):
                # No known age counts as brand new: a write of another machine is never cut short on a guess.
                mtime = entry.get("mtime") or entry.get("created") or entry.get("LastModified") or time.time()
                mtime = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)
                out.append(FileInfo(posixpath.join(folder, name) if folder else name, int(entry.get("size") or 0), mtime))
        return out

    def read(self, path: str) -> bytes:
        try:
            return self.fs.cat_file(self._abs(path))
        except FileNotFoundError as exc:
            raise StoreError(f"{path} is missing from {self.url}") from exc
        except OSError as exc:
            raise StoreError(f"reading {path} from {self.url} failed: {exc}") from exc

    def open_blob(self, path: str, progress: Progress | None = None) -> Buffer:
        return bytearray(self.read(path))

    def write(self, path: str, chunks: Iterable[Buffer], progress: Progress | None = None) -> None:
        final = self._abs(path)
        folder, name = final.rsplit("/", 1)
        tmp = f"{folder}/{temp_name(name)}"
        try:
            self.fs.makedirs(folder, exist_ok=True)
            with self.fs.open(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    if progress:
                        progress(memoryview(chunk).nbytes)
            self.fs.mv(tmp, final)
        except OSError as exc:
            try:
                self.fs.rm(tmp)
            except OSError:
                pass
            raise StoreError(f"writing {path} to {self.url} failed: {exc}") from exc

    def delete(self, path: str) -> None:
        try:
            self.fs.rm(self._abs(path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"deleting {path} from {self.url} failed: {exc}") from exc

    def exists(self, path: str) -> bool:
        return bool(self.fs.isfile(self._abs(path)))


def open_store(location: str | os.PathLike[str] | Store) -> Store:
    """A store for a folder path, a URL, or an existing store object.

    ``gdrive://FOLDER`` opens Google Drive through its API (needs ``pip install 'nbguard[drive]'``);
    ``memory://NAME`` an instance-scoped in-memory store; any other ``scheme://`` goes to fsspec.
    """
    if isinstance(location, Store):
        return location
    text = os.fspath(location)
    if not isinstance(text, str) or not text.strip():
        raise UsageError("the store location is empty: pass a folder path or a URL such as gdrive://nbguard")
    if "://" not in text:
        path = os.path.abspath(os.path.expanduser(text))
        if any(path == m or path.startswith(m + os.sep) for m in mount_prefixes()):
            return _staged(path, lambda: LocalStore(path), "mount")
        return LocalStore(path)
    scheme = text.split("://", 1)[0].lower()
    if scheme == "file":
        return LocalStore(text.split("://", 1)[1])
    if scheme == "memory":
        return _named_memory_store(text.split("://", 1)[1] or "memory")
    if scheme in ("gdrive", "drive"):
        try:
            from .drive import open_drive_store
        except ImportError as exc:
            raise UsageError(
                "Google Drive support needs extra packages: pip install 'nbguard[drive]'"
            ) from exc
        return _staged(text, lambda: open_drive_store(text), "api")
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as exc:
        raise UsageError(
            f"unknown store URL scheme {scheme!r} in {text!r}: use a folder path, memory://NAME, "
            "gdrive://FOLDER, or an fsspec URL whose package is installed"
        ) from exc
    return FsspecStore(text)


def mount_prefixes() -> list[str]:
    """Folders that are network mounts, where a write returning does not mean the bytes are safe:
    Colab's Drive mount, plus any in ``NBGUARD_MOUNT_PREFIXES`` (os.pathsep-separated)."""
    extra = [p for p in os.environ.get("NBGUARD_MOUNT_PREFIXES", "").split(os.pathsep) if p]
    return [os.path.abspath(p) for p in ["/content/drive", *extra]]


def staging_folder(location: str) -> str:
    """The local folder where saves to ``location`` land first (``NBGUARD_STAGING`` overrides the base)."""
    import hashlib

    base = os.environ.get("NBGUARD_STAGING") or os.path.join(os.path.expanduser("~"), ".cache", "nbguard", "staging")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", location).strip("-")[-60:]
    return os.path.join(base, f"{name}-{hashlib.sha1(location.encode()).hexdigest()[:8]}")


_staged_stores: dict[str, Store] = {}


def _staged(location: str, remote: Callable[[], Store], kind: str) -> Store:
    # One replicated store (one uploader thread) per location and process.
    with _memory_lock:
        store = _staged_stores.get(location)
        if store is None:
            from .replica import ReplicatedStore

            store = ReplicatedStore(LocalStore(staging_folder(location)), remote(), remote_kind=kind)
            store.resync()  # finish uploads an earlier session (killed mid-upload) left behind
            _staged_stores[location] = store
        return store


_memory_stores: dict[str, MemoryStore] = {}
_memory_lock = threading.Lock()


def _named_memory_store(name: str) -> MemoryStore:
    # The same memory:// URL must reach the same store within a process (a magic's --dir and the
    # panel name it independently), but never across processes or different names.
    with _memory_lock:
        if name not in _memory_stores:
            _memory_stores[name] = MemoryStore(name)
        return _memory_stores[name]
