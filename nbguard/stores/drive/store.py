"""``DriveStore``: the Store contract on a Google Drive folder, through the Drive API.

``gdrive://nbguard/mynotebook`` is the folder path nbguard/mynotebook from the root of My Drive;
``gdrive://root/...`` says the same explicitly, and ``gdrive://<folder id>/...`` starts at any folder
(a shared drive's, for service accounts). Store paths map onto sub-folders and file titles.

Drive allows several files with one title: ``write`` uploads the new file, then deletes the older
ones; readers take the newest if they meet duplicates. ``delete`` is permanent (trashed files still
count against the quota).
"""

from __future__ import annotations

import builtins
import io
import logging
import mmap
import os
import posixpath
import re
import tempfile
import threading
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from ...errors import StoreError, UsageError
from ..base import BlobBuffer, Buffer, FileInfo, Progress, check_relative, describe_os_error
from .client import DriveClient
from .retry import RetryPolicy
from .transfer import DEFAULT_CHUNK_SIZE, UPLOAD_GRANULE, ParentGoneError, download, upload

log = logging.getLogger("nbguard.stores.drive")

SCHEMES = ("gdrive", "drive")
_ID = re.compile(r"[A-Za-z0-9_-]{19,}")


def parse_drive_url(url: str) -> tuple[str, tuple[str, ...]]:
    """(root: 'root' or a folder id, folder path below it) of a ``gdrive://`` URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise UsageError(f"{url!r} is not a Google Drive URL: use gdrive://FOLDER/PATH")
    parts = tuple(p for p in rest.split("/") if p)
    if any(p in (".", "..") or "\\" in p for p in parts):
        raise UsageError(f"{url!r} has '.', '..' or backslashes in its folder path")
    if parts and (parts[0] == "root" or looks_like_id(parts[0])):
        return parts[0], parts[1:]
    return "root", parts


def looks_like_id(text: str) -> bool:
    """Drive ids are long runs of letters, digits, '-' and '_' with at least one digit."""
    return bool(_ID.fullmatch(text)) and any(c.isdigit() for c in text) and any(c.isalpha() for c in text)


def _stamp(meta: dict[str, Any]) -> tuple[float, float, str]:
    return (_time(meta.get("modifiedDate")), _time(meta.get("createdDate")), meta.get("id", ""))


def _time(text: str | None) -> float:
    if not text:
        return 0.0
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def newest(items: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(items, key=_stamp, default=None)


def _oldest(folders: list[dict[str, Any]]) -> str | None:
    return min(folders, key=lambda m: (_time(m.get("createdDate")), m["id"]))["id"] if folders else None


class DriveStore:
    """A folder of Google Drive as an nbguard store (see the module doc for URLs and semantics)."""

    def __init__(self, url: str, *, credentials: Any = None, api_root: str | None = None,
                 client: DriveClient | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 retry: RetryPolicy | None = None, cache_dir: str | os.PathLike[str] | None = None,
                 timeout: float | None = 120.0):
        if chunk_size <= 0 or chunk_size % UPLOAD_GRANULE:
            raise UsageError(f"chunk_size must be a positive multiple of 256 KiB, not {chunk_size}")
        self.url = url
        self._root_spec, self._base = parse_drive_url(url)
        self._client = client or DriveClient(credentials, api_root=api_root, retry=retry, timeout=timeout)
        self.chunk_size = chunk_size
        self.cache_dir = os.fspath(cache_dir) if cache_dir else os.path.join(tempfile.gettempdir(), "nbguard-drive")
        self._ids: dict[tuple[str, ...], str] = {}  # folder path (from the URL's root) -> folder id
        self._root_id: str | None = None
        self._lock = threading.Lock()
        self._create_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DriveStore({self.url!r})"

    @property
    def client(self) -> DriveClient:
        return self._client

    # -- folders -------------------------------------------------------------------------------
    def _root(self) -> str:
        if self._root_id is None:
            root, base = self._root_spec, self._base
            if root != "root":
                meta = self._client.get(root)
                if meta is None:
                    log.warning("nbguard: no Drive folder has the id %s; using it as a folder name in My Drive", root)
                    root, base = "root", (root, *base)
                elif meta.get("mimeType") != "application/vnd.google-apps.folder":
                    raise UsageError(f"{self.url}: {root} is a file, not a folder")
            with self._lock:
                self._root_spec, self._base, self._root_id = root, base, root
        return self._root_id

    def _folder_id(self, folder: str, create: bool) -> str | None:
        """The id of a store folder ('' is the store's own), created with its parents if ``create``."""
        rel = tuple(check_relative(folder).split("/")) if folder else ()
        parent = self._root()
        path = self._base + rel
        for depth in range(1, len(path) + 1):
            key = path[:depth]
            with self._lock:
                cached = self._ids.get(key)
            if cached is None:
                cached = self._subfolder(parent, key[-1], create)
                if cached is None:
                    return None
                with self._lock:
                    self._ids[key] = cached
            parent = cached
        return parent

    def _created_folder_id(self, folder: str) -> str:
        """The id of a store folder, created with its parents when missing."""
        fid = self._folder_id(folder, create=True)
        assert fid is not None  # a created folder has an id
        return fid

    def _subfolder(self, parent: str, name: str, create: bool) -> str | None:
        if not create:
            return _oldest(self._client.children(parent, title=name, folders=True))
        with self._create_lock:  # one creator per store; the look-up inside sees earlier creations
            found = _oldest(self._client.children(parent, title=name, folders=True))
            if found is None:
                created = self._client.create_folder(name, parent)["id"]
                # A retried insert or another process can leave twins: everyone settles on the oldest.
                found = _oldest(self._client.children(parent, title=name, folders=True)) or created
            return found

    def _forget_folders(self) -> None:
        with self._lock:
            self._ids.clear()

    def _find_all(self, path: str) -> builtins.list[dict[str, Any]]:
        folder, name = posixpath.split(check_relative(path))
        fid = self._folder_id(folder, create=False)
        return [] if fid is None else self._client.children(fid, title=name, folders=False)

    def _find(self, path: str) -> dict[str, Any] | None:
        return newest(self._find_all(path))

    def _require(self, path: str) -> dict[str, Any]:
        meta = self._find(path)
        if meta is None:
            raise StoreError(f"{path} is missing from {self.url}")
        return meta

    # -- the Store contract -----------------------------------------------------------------------
    def list(self, folder: str) -> builtins.list[FileInfo]:
        fid = self._folder_id(folder, create=False)
        if fid is None:
            return []
        by_title: dict[str, dict[str, Any]] = {}
        for meta in self._client.children(fid, folders=False):
            if "fileSize" not in meta:  # Google Docs and the like have no bytes of their own
                continue
            title = meta["title"]
            if title not in by_title or _stamp(meta) > _stamp(by_title[title]):
                by_title[title] = meta
        return [FileInfo(posixpath.join(folder, t) if folder else t, int(m["fileSize"]), _time(m.get("modifiedDate")))
                for t, m in sorted(by_title.items())]

    def folders(self, folder: str) -> builtins.list[str]:
        fid = self._folder_id(folder, create=False)
        if fid is None:
            return []
        return sorted({m["title"] for m in self._client.children(fid, folders=True)})

    def read(self, path: str) -> bytes:
        out = io.BytesIO()
        download(self._client, self._require(path), out, chunk_size=self.chunk_size)
        return out.getvalue()

    def open_blob(self, path: str, progress: Progress | None = None) -> BlobBuffer:
        """Download to a file under ``cache_dir`` and map it read-only.

        On POSIX the file is unlinked once mapped: its disk space returns when the map is released.
        """
        meta = self._require(path)
        if int(meta.get("fileSize", 0)) == 0:
            return b""
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f"{meta['id']}-", suffix=".part", dir=self.cache_dir)
        except OSError as exc:
            raise StoreError(describe_os_error(exc, self.cache_dir)) from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                download(self._client, meta, fh, chunk_size=self.chunk_size, progress=progress)
            with open(tmp, "rb") as fh:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # private: tensors on it are writable
        except OSError as exc:
            _remove_quietly(tmp)
            raise StoreError(describe_os_error(exc, self.cache_dir)) from exc
        except BaseException:
            _remove_quietly(tmp)
            raise
        if os.name == "posix":
            _remove_quietly(tmp)
        return mapped

    def write(self, path: str, chunks: Iterable[Buffer], progress: Progress | None = None) -> None:
        folder, name = posixpath.split(check_relative(path))
        for attempt in range(2):
            fid = self._created_folder_id(folder)
            try:
                meta = upload(self._client, name, fid, chunks, chunk_size=self.chunk_size, progress=progress)
                break
            except ParentGoneError:  # raised before any chunk is consumed, so a second try is safe
                if attempt:
                    raise
                self._forget_folders()
        mine = _stamp(meta)
        for other in self._client.children(fid, title=name, folders=False):
            # Only older twins: a listing may lag behind the upload, and a newer one is someone else's.
            if other["id"] != meta["id"] and _stamp(other) <= mine:
                self._client.delete(other["id"])

    def delete(self, path: str) -> None:
        for meta in self._find_all(path):
            self._client.delete(meta["id"])

    def exists(self, path: str) -> bool:
        return self._find(path) is not None

    # -- Drive extras ------------------------------------------------------------------------------
    def quota(self) -> tuple[int, int]:
        """(bytes used, bytes total) of the account; trashed files count as used; total 0 means unlimited."""
        about = self._client.about()
        used = about.get("quotaBytesUsedAggregate") or about.get("quotaBytesUsed") or 0
        return int(used), int(about.get("quotaBytesTotal") or 0)

    def md5(self, path: str) -> str:
        """The md5 Drive computed for the file's bytes."""
        return self._require(path).get("md5Checksum", "")

    def size(self, path: str) -> int:
        return int(self._require(path).get("fileSize", 0))

    def verify(self, path: str, local_md5: str) -> bool:
        """Whether the file exists on Drive with this md5 (hex)."""
        meta = self._find(path)
        return meta is not None and meta.get("md5Checksum", "").lower() == local_md5.lower()


def open_drive_store(url: str, **options: Any) -> DriveStore:
    """A DriveStore for ``gdrive://FOLDER``; options as for DriveStore (credentials, api_root, ...)."""
    return DriveStore(url, **options)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
