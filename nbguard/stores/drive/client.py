"""A Drive v2 client: pydrive2 for auth wiring, listing and metadata; raw authorized HTTP for bytes.

The service is built from googleapiclient's bundled v2 discovery document with its root URL
rewritten to ``api_root`` (default ``https://www.googleapis.com/``, or ``$NBGUARD_DRIVE_API_ROOT``),
so the same client runs against Google or against an emulator on this machine.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any, Literal, TypeVar, overload

import httplib2
from googleapiclient.discovery import build_from_document
from googleapiclient.discovery_cache import get_static_doc
from pydrive2.auth import GoogleAuth
from pydrive2.drive import GoogleDrive
from pydrive2.files import GoogleDriveFile

from . import retry
from .auth import DRIVE_SCOPE, OAuth2Bridge, check_endpoint, load_credentials
from .retry import DriveHTTPError, RetryPolicy

API_ROOT_ENV = "NBGUARD_DRIVE_API_ROOT"
DEFAULT_API_ROOT = "https://www.googleapis.com/"
FOLDER_MIME = "application/vnd.google-apps.folder"
T = TypeVar("T")


def resolve_api_root(api_root: str | None = None) -> str:
    """The API root to use: the argument, else ``$NBGUARD_DRIVE_API_ROOT``, else Google's; ends with '/'."""
    root = (api_root or os.environ.get(API_ROOT_ENV, "").strip() or DEFAULT_API_ROOT).rstrip("/") + "/"
    return check_endpoint(root, "the Drive API root")


@functools.lru_cache(maxsize=1)
def _bundled_v2_document() -> str:
    doc = get_static_doc("drive", "v2")
    if doc is None:  # pragma: no cover - every googleapiclient release since 2.0 bundles it
        raise RuntimeError("googleapiclient lacks its bundled Drive v2 discovery document: reinstall it")
    return doc


def discovery_document(api_root: str) -> dict[str, Any]:
    """The bundled Drive v2 discovery document, pointed at ``api_root``.

    googleapiclient derives request URLs from ``baseUrl``, media upload URLs from ``rootUrl`` +
    'upload/' + ``servicePath``, and the batch URL from ``rootUrl`` + ``batchPath``.
    """
    doc = json.loads(_bundled_v2_document())
    doc["rootUrl"] = doc["mtlsRootUrl"] = api_root
    doc["baseUrl"] = api_root + doc["servicePath"]
    doc["batchPath"] = doc.get("batchPath", "batch/drive/v2").lstrip("/")
    return doc


class ApiRootAuth(GoogleAuth):
    """pydrive2's GoogleAuth with google-auth credentials and a service built for ``api_root``."""

    def __init__(self, bridge: OAuth2Bridge, api_root: str, timeout: float | None):
        settings = {**GoogleAuth.DEFAULT_SETTINGS, "oauth_scope": [DRIVE_SCOPE]}
        super().__init__(settings_file=None, http_timeout=timeout, settings=settings)
        self.api_root = api_root
        self.credentials = bridge
        self.auth_method = "nbguard"

    def Authorize(self) -> None:  # noqa: N802 - pydrive2's name; LoadAuth calls it to build the service
        self.http = self.credentials.authorize(self._build_http())
        self.service = build_from_document(discovery_document(self.api_root), http=self.http)


class DriveClient:
    """Drive v2 calls with retries; every failure surfaces as a StoreError that says what to do."""

    def __init__(self, credentials: Any = None, *, api_root: str | None = None, retry: RetryPolicy | None = None,
                 timeout: float | None = 120.0):
        self.api_root = resolve_api_root(api_root)
        self.retry = retry or RetryPolicy()
        self.auth = ApiRootAuth(OAuth2Bridge(load_credentials(credentials)), self.api_root, timeout)

    def __repr__(self) -> str:
        return f"DriveClient(api_root={self.api_root!r})"

    # -- plumbing ------------------------------------------------------------------------------
    def http(self) -> httplib2.Http:
        """This thread's authorized HTTP object (httplib2 objects are not thread-safe)."""
        local = self.auth.thread_local
        if getattr(local, "http", None) is None:
            local.http = self.auth.Get_Http_Object()
        return local.http

    def _on_error(self, exc: BaseException) -> None:
        if retry.is_connection_error(exc):
            # httplib2 may keep a broken socket in its pool; start afresh
            self.auth.thread_local.http = None

    @overload
    def call(self, fn: Callable[[], T], doing: str, *, missing_ok: Literal[False] = False) -> T: ...

    @overload
    def call(self, fn: Callable[[], T], doing: str, *, missing_ok: bool) -> T | None: ...

    def call(self, fn: Callable[[], T], doing: str, *, missing_ok: bool = False) -> T | None:
        """``fn()`` with this client's retry policy (see ``retry.call``); None only with ``missing_ok``."""
        return retry.call(fn, self.retry, doing, on_error=self._on_error, missing_ok=missing_ok)

    def send(self, method: str, url: str, body: bytes | bytearray | memoryview | None = None,
             headers: dict[str, str] | None = None, ok: tuple[int, ...] = (200, 201)) -> tuple[httplib2.Response, bytes]:
        """One authorized request; a status outside ``ok`` raises DriveHTTPError."""
        resp, content = self.http().request(url, method, body=body, headers=headers or {})
        if resp.status not in ok:
            raise DriveHTTPError.from_response(resp, content)
        return resp, content

    def forget_http(self, exc: BaseException) -> None:
        """Call after a failed raw request (resets the connection pool on connection errors)."""
        self._on_error(exc)

    # -- metadata, through pydrive2 ------------------------------------------------------------
    def about(self) -> dict[str, Any]:
        # A GoogleDrive per call: pydrive2 keeps the per-call HTTP object on the instance.
        return self.call(lambda: GoogleDrive(self.auth).GetAbout(), "reading the Drive quota")

    def get(self, file_id: str) -> dict[str, Any] | None:
        """A file's metadata, or None if there is no such file."""
        f = GoogleDriveFile(auth=self.auth, metadata={"id": file_id})
        if self.call(lambda: f.FetchMetadata() or True, f"reading the metadata of {file_id}", missing_ok=True):
            return dict(f)
        return None

    def children(self, parent_id: str, *, title: str | None = None, folders: bool | None = None) -> list[dict]:
        """Untrashed items directly in a folder; only those named ``title``; only (non-)folders."""
        q = [f"'{quote(parent_id)}' in parents", "trashed=false"]
        if title is not None:
            q.append(f"title = '{quote(title)}'")
        if folders is not None:
            q.append(f"mimeType {'=' if folders else '!='} '{FOLDER_MIME}'")
        listing = GoogleDrive(self.auth).ListFile({"q": " and ".join(q), "maxResults": 1000})
        items: list[dict] = []
        while True:  # page by page, so a retry repeats one page, not the whole listing
            page = self.call(lambda: next(listing, None), "listing a Drive folder")
            if page is None:
                return items
            items.extend(dict(f) for f in page)

    def create_folder(self, title: str, parent_id: str) -> dict[str, Any]:
        f = GoogleDriveFile(auth=self.auth, metadata={"title": title, "mimeType": FOLDER_MIME,
                                                       "parents": [{"id": parent_id}]})
        self.call(f.Upload, f"creating the Drive folder {title}")
        return dict(f)

    def delete(self, file_id: str) -> None:
        """Delete permanently (not to the trash, which still counts against the quota); missing is fine."""
        f = GoogleDriveFile(auth=self.auth, metadata={"id": file_id}, uploaded=True)
        self.call(f.Delete, f"deleting {file_id}", missing_ok=True)


def quote(text: str) -> str:
    """Escape a string for a single-quoted literal in a Drive query."""
    return text.replace("\\", "\\\\").replace("'", "\\'")
