"""``FsspecStore``: a folder on any fsspec file system (``s3://``, ``gcs://`` ...)."""

from __future__ import annotations

import builtins
import posixpath
import time
from collections.abc import Iterable

from ..errors import StoreError, UsageError
from .base import Buffer, FileInfo, Progress, check_relative
from .owner import TEMP_PREFIX, temp_name


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

    def _ls(self, folder: str) -> builtins.list[dict]:
        try:
            return self.fs.ls(self._folder(folder), detail=True)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"listing {self.url}/{folder} failed: {exc}") from exc

    def list(self, folder: str) -> builtins.list[FileInfo]:
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

    def folders(self, folder: str) -> builtins.list[str]:
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self._ls(folder) if e.get("type") == "directory"
        )

    def temp_files(self, folder: str) -> builtins.list[FileInfo]:
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

