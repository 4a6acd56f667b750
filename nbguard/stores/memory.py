"""``MemoryStore``: an in-memory store scoped to its instance (tests and teaching)."""

from __future__ import annotations

import builtins
import io
import threading
import time
from collections.abc import Iterable

from ..errors import StoreError
from .base import Buffer, FileInfo, Progress, check_relative


class MemoryStore:
    """An in-memory store, scoped to this instance (for tests and teaching)."""

    def __init__(self, name: str = "memory"):
        self.url = f"memory://{name}"
        self._files: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryStore({self.url!r})"

    def list(self, folder: str) -> builtins.list[FileInfo]:
        prefix = f"{folder}/" if folder else ""
        with self._lock:
            items = list(self._files.items())
        return [
            FileInfo(path, len(data), mtime)
            for path, (data, mtime) in items
            if path.startswith(prefix) and "/" not in path[len(prefix):]
        ]

    def folders(self, folder: str) -> builtins.list[str]:
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

