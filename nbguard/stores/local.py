"""``LocalStore``: a folder on the local disk or on a mounted drive."""

from __future__ import annotations

import builtins
import contextlib
import mmap
import os
import posixpath
import stat
from collections.abc import Callable, Iterable, Iterator

from ..errors import StoreError, UsageError
from . import directio
from .base import BlobBuffer, Buffer, EventHook, FileInfo, Progress, check_relative, describe_os_error
from .filereader import FileReader
from .owner import TEMP_PREFIX, temp_name


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

    def list(self, folder: str) -> builtins.list[FileInfo]:
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

    def temp_files(self, folder: str) -> builtins.list[FileInfo]:
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

    def folders(self, folder: str) -> builtins.list[str]:
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

    def open_blob(self, path: str, progress: Progress | None = None) -> BlobBuffer:
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

    def open_reader(self, path: str) -> FileReader:
        """Positional, verified-as-you-go reads of one file (for restoring without a memory map)."""
        full = self._abs(path, leaf="file")
        try:
            return FileReader(full)
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

