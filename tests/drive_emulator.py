"""An HTTP emulator of the Google Drive API v2, for tests and benchmarks.

It speaks what pydrive2 (through googleapiclient) and ``nbguard.stores.drive`` send: files insert
(metadata only, multipart, media, resumable), get (metadata and ``alt=media`` with ``Range``), list
with the ``q`` queries pydrive2 builds, patch/update, delete, trash/untrash, ``about``, an OAuth
token endpoint, and bearer-token checks. File bodies live on disk so that 1 GiB uploads work.

    with DriveEmulator() as emu:
        store = DriveStore("gdrive://nbguard", credentials=emu.authorized_user_info(), api_root=emu.url)
        emu.inject("503", times=2, match="PUT /upload/")

Faults (``inject``): "500", "503", "429", "rate_limit", "user_rate_limit" (403s), "quota"
(403 storageQuotaExceeded), "auth" (401), "drop" (read ``after_bytes`` of the body, keep them if it
is an upload chunk, then reset the connection) and "slow" (wait ``delay`` seconds, then answer).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import struct
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

FOLDER_MIME = "application/vnd.google-apps.folder"
UPLOAD_GRANULE = 256 * 1024  # non-final resumable chunks must be multiples of this
SIMPLE_UPLOAD_CAP = 64 << 20  # multipart/media bodies are held in memory
_PIECE = 1 << 20

ERROR_FAULTS: dict[str, tuple[int, str, str]] = {
    "500": (500, "backendError", "Backend Error"),
    "503": (503, "backendError", "Service Unavailable"),
    "429": (429, "rateLimitExceeded", "Too Many Requests"),
    "rate_limit": (403, "rateLimitExceeded", "Rate Limit Exceeded"),
    "user_rate_limit": (403, "userRateLimitExceeded", "User Rate Limit Exceeded"),
    "quota": (403, "storageQuotaExceeded", "The user's Drive storage quota has been exceeded."),
    "auth": (401, "authError", "Invalid Credentials"),
}
FAULT_KINDS = frozenset(ERROR_FAULTS) | {"drop", "slow"}

Matcher = Callable[[str, str, dict[str, str], dict[str, str]], bool]


@dataclass
class Fault:
    """One injected fault: applies to the matching requests after ``skip`` of them, ``times`` times."""

    kind: str
    times: int = 1
    match: str | Matcher | None = None
    skip: int = 0
    after_bytes: int = 0
    delay: float = 0.0
    hits: int = 0

    def matches(self, method: str, path: str, query: dict[str, str], headers: dict[str, str]) -> bool:
        if self.match is None:
            return path != "/token"
        if callable(self.match):
            return self.match(method, path, query, headers)
        target = f"{method} {path}?{'&'.join(f'{k}={v}' for k, v in query.items())}"
        return self.match in target


@dataclass
class RequestRecord:
    """One request as the emulator saw it; ``status`` is -1 for a dropped connection."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    status: int = 0
    fault: str | None = None

    @property
    def content_range(self) -> str | None:
        return self.headers.get("content-range")

    @property
    def range(self) -> str | None:
        return self.headers.get("range")

    @property
    def upload_start(self) -> int | None:
        """First byte offset a resumable data chunk carries (None for status queries and others)."""
        m = re.fullmatch(r"bytes (\d+)-\d+/(\*|\d+)", (self.content_range or "").strip())
        return int(m[1]) if m else None

    @property
    def is_status_query(self) -> bool:
        return (self.content_range or "").strip().startswith("bytes */")


@dataclass
class _File:
    id: str
    title: str
    mime: str
    parents: list[str]
    created: float
    modified: float
    size: int = 0
    md5: str | None = None
    blob: str | None = None
    trashed: bool = False
    explicitly_trashed: bool = False

    @property
    def is_folder(self) -> bool:
        return self.mime == FOLDER_MIME


@dataclass
class _Session:
    id: str
    meta: dict
    target: str | None
    path: str
    total: int | None = None
    received: int = 0
    md5: object = field(default_factory=hashlib.md5)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: str | None = None


class _ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def body(self) -> dict:
        errors = [{"domain": "global", "reason": self.reason, "message": self.message}]
        return {"error": {"errors": errors, "code": self.code, "message": self.message}}


class DriveEmulator:
    """A Drive v2 server on 127.0.0.1 with a random port; ``url`` is the API root to point clients at."""

    def __init__(self, *, quota_bytes: int = 15 << 30, token_lifetime: int = 3600, page_size: int = 1000,
                 workdir: str | None = None):
        self.quota_bytes = quota_bytes
        self.token_lifetime = token_lifetime
        self.page_size = page_size
        self.client_id = "emulator-client.apps.googleusercontent.com"
        self.client_secret = "emu-secret-" + secrets.token_hex(8)
        self.refresh_token = "1//emu-refresh-" + secrets.token_hex(16)
        self.root_id = "0AEmuRoot" + secrets.token_hex(6)
        self.requests: list[RequestRecord] = []
        self.errors: list[str] = []  # tracebacks of emulator bugs
        self.token_requests = 0
        self._workdir_arg = workdir
        self._workdir: str | None = None
        self._lock = threading.RLock()
        self._files: dict[str, _File] = {}
        self._sessions: dict[str, _Session] = {}
        self._tokens: dict[str, float] = {}
        self._faults: list[Fault] = []
        self._last_time = 0.0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> DriveEmulator:
        self._workdir = tempfile.mkdtemp(prefix="drive-emu-", dir=self._workdir_arg)
        now = self._now()
        self._files[self.root_id] = _File(self.root_id, "My Drive", FOLDER_MIME, [], now, now)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.emulator = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="drive-emulator",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> DriveEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start the emulator first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    @property
    def token_uri(self) -> str:
        return self.url + "token"

    # -- credentials ------------------------------------------------------------------------
    def authorized_user_info(self) -> dict[str, str]:
        """An authorized-user credentials JSON whose token endpoint is this emulator."""
        return {"type": "authorized_user", "client_id": self.client_id, "client_secret": self.client_secret,
                "refresh_token": self.refresh_token, "token_uri": self.token_uri}

    def issue_token(self) -> str:
        token = "ya29.emu-" + secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = time.time() + self.token_lifetime
        return token

    def expire_tokens(self) -> None:
        """Make every access token issued so far invalid (clients must refresh)."""
        with self._lock:
            self._tokens.clear()

    def revoke(self) -> None:
        """Revoke the refresh token and every access token."""
        with self._lock:
            self._tokens.clear()
            self.refresh_token = "revoked-" + secrets.token_hex(8)

    # -- faults and records -----------------------------------------------------------------
    def inject(self, kind: str | int, times: int = 1, match: str | Matcher | None = None, *, skip: int = 0,
               after_bytes: int = 0, delay: float = 0.0) -> Fault:
        """Make the next matching requests fail; ``match`` is a substring of "METHOD /path?query"."""
        kind = str(kind)
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}: one of {sorted(FAULT_KINDS)}")
        fault = Fault(kind, times, match, skip, after_bytes, delay)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def _take_fault(self, method: str, path: str, query: dict[str, str], headers: dict[str, str]) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.hits >= fault.times or not fault.matches(method, path, query, headers):
                    continue
                if fault.skip > 0:
                    fault.skip -= 1
                    continue
                fault.hits += 1
                return fault
        return None

    # -- inspection and seeding -------------------------------------------------------------
    def files(self, include_trashed: bool = True) -> list[dict]:
        """The JSON of every file and folder except the root."""
        with self._lock:
            return [self._json(f) for f in self._files.values()
                    if f.id != self.root_id and (include_trashed or not f.trashed)]

    def content(self, file_id: str) -> bytes:
        with self._lock:
            blob = self._files[file_id].blob
        if blob is None:
            return b""
        with open(blob, "rb") as fh:
            return fh.read()

    def open_uploads(self) -> int:
        """Resumable upload sessions that have not completed."""
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.done is None)

    def received_bytes(self) -> int:
        """Bytes held by upload sessions that have not completed."""
        with self._lock:
            return sum(s.received for s in self._sessions.values() if s.done is None)

    def quota_used(self, in_trash: bool = False) -> int:
        with self._lock:
            return sum(f.size for f in self._files.values() if f.trashed or not in_trash)

    def add_folder(self, title: str, parent: str | None = None) -> str:
        return self._create(title, FOLDER_MIME, parent or self.root_id, b"").id

    def add_file(self, title: str, data: bytes = b"", parent: str | None = None) -> str:
        return self._create(title, "application/octet-stream", parent or self.root_id, data).id

    # -- state (call with or without the lock; RLock) ---------------------------------------
    def _now(self) -> float:
        with self._lock:
            self._last_time = max(time.time(), self._last_time + 0.001)
            return self._last_time

    def _new_id(self) -> str:
        return "1" + secrets.token_urlsafe(24).replace("-", "x").replace("_", "y")

    def _blob_path(self, name: str) -> str:
        assert self._workdir is not None
        return os.path.join(self._workdir, name)

    def _create(self, title: str, mime: str, parent: str, data: bytes | None, blob: str | None = None,
                md5: str | None = None, size: int = 0) -> _File:
        with self._lock:
            parent = self._parent(parent)
            now = self._now()
            f = _File(self._new_id(), title, mime, [parent], now, now)
            if mime != FOLDER_MIME:
                if blob is None:
                    blob = self._blob_path(f.id)
                    with open(blob, "wb") as fh:
                        fh.write(data or b"")
                    md5, size = hashlib.md5(data or b"").hexdigest(), len(data or b"")
                f.blob, f.md5, f.size = blob, md5, size
            self._files[f.id] = f
            return f

    def _parent(self, parent_id: str) -> str:
        pid = self.root_id if parent_id == "root" else parent_id
        f = self._files.get(pid)
        if f is None or not f.is_folder:
            raise _ApiError(404, "notFound", f"File not found: {parent_id}")
        return pid

    def _get(self, file_id: str) -> _File:
        f = self._files.get(self.root_id if file_id == "root" else file_id)
        if f is None:
            raise _ApiError(404, "notFound", f"File not found: {file_id}")
        return f

    def _descendants(self, f: _File) -> list[_File]:
        out, todo = [], [f.id]
        while todo:
            pid = todo.pop()
            for child in self._files.values():
                if pid in child.parents:
                    out.append(child)
                    todo.append(child.id)
        return out

    def _remove(self, f: _File) -> None:
        for victim in [f, *self._descendants(f)]:
            self._files.pop(victim.id, None)
            if victim.blob:
                with contextlib.suppress(OSError):
                    os.remove(victim.blob)

    def _set_trashed(self, f: _File, trashed: bool) -> None:
        f.trashed, f.explicitly_trashed = trashed, trashed
        for child in self._descendants(f):
            if trashed and not child.trashed:
                child.trashed = True
            elif not trashed and not child.explicitly_trashed:
                child.trashed = False

    def _json(self, f: _File) -> dict:
        out = {
            "kind": "drive#file", "id": f.id, "title": f.title, "mimeType": f.mime,
            "parents": [{"kind": "drive#parentReference", "id": p, "isRoot": p == self.root_id} for p in f.parents],
            "createdDate": _rfc3339(f.created), "modifiedDate": _rfc3339(f.modified),
            "labels": {"trashed": f.trashed, "starred": False, "hidden": False, "restricted": False, "viewed": True},
            "explicitlyTrashed": f.explicitly_trashed, "quotaBytesUsed": str(f.size),
        }
        if not f.is_folder:
            out.update(fileSize=str(f.size), md5Checksum=f.md5, originalFilename=f.title,
                       downloadUrl=f"{self.url}drive/v2/files/{f.id}?alt=media")
        return out

    def _about(self) -> dict:
        used, trash = self.quota_used(), self.quota_used(in_trash=True)
        return {"kind": "drive#about", "name": "Emulated User", "rootFolderId": self.root_id,
                "quotaType": "LIMITED", "quotaBytesTotal": str(self.quota_bytes), "quotaBytesUsed": str(used),
                "quotaBytesUsedAggregate": str(used), "quotaBytesUsedInTrash": str(trash),
                "user": {"kind": "drive#user", "displayName": "Emulated User", "emailAddress": "user@example.com"}}

    def _check_auth(self, header: str | None) -> None:
        if not header:
            raise _ApiError(401, "required", "Login Required")
        scheme, _, token = header.partition(" ")
        with self._lock:
            expiry = self._tokens.get(token) if scheme.lower() == "bearer" else None
        if expiry is None or expiry < time.time():
            raise _ApiError(401, "authError", "Invalid Credentials")

    def _query(self, q: str | None) -> Callable[[_File], bool]:
        tests = [_clause(part, self.root_id) for part in _split_and(q)] if q else []
        return lambda f: all(test(f) for test in tests)


# -- the q language: clauses joined by 'and' -----------------------------------------------------
_STRING = r"'((?:[^'\\]|\\.)*)'"


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _split_and(q: str) -> list[str]:
    parts, buf, i, quoted = [], [], 0, False
    while i < len(q):
        if quoted and q[i] == "\\":
            buf.append(q[i:i + 2])
            i += 2
            continue
        if q[i] == "'":
            quoted = not quoted
        elif not quoted and (m := re.match(r"\s+and\s+", q[i:], re.IGNORECASE)):
            parts.append("".join(buf))
            buf, i = [], i + m.end()
            continue
        buf.append(q[i])
        i += 1
    parts.append("".join(buf))
    return [p.strip() for p in parts if p.strip()]


def _clause(text: str, root_id: str) -> Callable[[_File], bool]:
    if m := re.fullmatch(_STRING + r"\s+in\s+parents", text):
        pid = _unescape(m[1])
        pid = root_id if pid == "root" else pid
        return lambda f: pid in f.parents
    if m := re.fullmatch(r"trashed\s*=\s*(true|false)", text, re.IGNORECASE):
        want = m[1].lower() == "true"
        return lambda f: f.trashed == want
    if m := re.fullmatch(r"(title|mimeType)\s*(=|!=|contains)\s*" + _STRING, text):
        attr, op, value = m[1], m[2], _unescape(m[3])

        def test(f: _File) -> bool:
            actual = f.title if attr == "title" else f.mime
            return {"=": actual == value, "!=": actual != value, "contains": value in actual}[op]

        return test
    raise _ApiError(400, "invalid", f"Invalid query: {text}")


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


# -- HTTP ------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "DriveEmulator/1"
    _remaining = 0  # bytes of the request body not read yet (set per request in _dispatch)

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes; without this, Nagle meets delayed ACKs (40 ms)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    @property
    def emu(self) -> DriveEmulator:
        return self.server.emulator  # type: ignore[attr-defined]

    # body and responses
    def _read(self, n: int) -> bytes:
        n = min(n, self._remaining)
        data = self.rfile.read(n) if n else b""
        self._remaining -= len(data)
        if len(data) < n:
            self._remaining = 0
            raise ConnectionResetError("client went away")
        return data

    def _drain(self) -> None:
        while self._remaining:
            self._read(min(self._remaining, _PIECE))

    def _body(self, cap: int = SIMPLE_UPLOAD_CAP) -> bytes:
        if self._remaining > cap:
            raise _ApiError(413, "uploadTooLarge", "Use a resumable upload for bodies this large")
        return self._read(self._remaining)

    def _json_body(self) -> dict:
        data = self._body(1 << 20)
        try:
            return json.loads(data) if data.strip() else {}
        except ValueError as exc:
            raise _ApiError(400, "parseError", "Parse Error") from exc

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json; charset=UTF-8") -> None:
        self._drain()
        self._rec.status = status
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if body or status not in (204, 308):
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _reset(self) -> None:
        """Abort the connection with a TCP reset (a FIN would let httplib2 silently resend)."""
        self._rec.status = -1
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    # routing
    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        path, query = split.path, dict(parse_qsl(split.query, keep_blank_values=True))
        headers = {k.lower(): v for k, v in self.headers.items()}
        self._remaining = int(headers.get("content-length") or 0)
        self._cut: int | None = None  # a "drop" of a download: bytes to send before the reset
        self._rec = RequestRecord(self.command, path, query,
                                  {k: v for k, v in headers.items() if k != "authorization"})
        with self.emu._lock:
            self.emu.requests.append(self._rec)
        try:
            fault = self.emu._take_fault(self.command, path, query, headers)
            if fault is not None:
                self._rec.fault = fault.kind
                if fault.kind == "drop" and not (self.command == "GET" and query.get("alt") == "media"):
                    return self._drop(fault, path, query)
                if fault.kind == "drop":
                    self._cut = fault.after_bytes
                elif fault.kind == "slow":
                    time.sleep(fault.delay)
                else:
                    raise _ApiError(*ERROR_FAULTS[fault.kind])
            if path == "/token" and self.command == "POST":
                return self._token()
            self.emu._check_auth(headers.get("authorization"))
            self._route(path, query)
        except _ApiError as err:
            self._send_json(err.code, err.body())
        except ConnectionError:
            self.close_connection = True
        except Exception:  # an emulator bug: answer 500 and keep the traceback for the test to show
            self.emu.errors.append(traceback.format_exc())
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send_json(500, _ApiError(500, "internalError", "emulator bug").body())

    def _route(self, path: str, query: dict[str, str]) -> None:
        method, emu = self.command, self.emu
        if path == "/drive/v2/about" and method == "GET":
            return self._send_json(200, emu._about())
        if path == "/drive/v2/files":
            if method == "GET":
                return self._list(query)
            if method == "POST":
                return self._insert(self._json_body(), None)
        if path == "/drive/v2/files/trash" and method == "DELETE":
            with emu._lock:
                for f in [f for f in emu._files.values() if f.explicitly_trashed]:
                    emu._remove(f)
            return self._send(204)
        if m := re.fullmatch(r"/drive/v2/files/([^/]+)(/trash|/untrash)?", path):
            return self._file(m[1], m[2], query)
        if m := re.fullmatch(r"/upload/drive/v2/files(?:/([^/]+))?", path):
            return self._upload(m[1], query)
        raise _ApiError(404, "notFound", f"Not Found: {method} {path}")

    def _token(self) -> None:
        emu = self.emu
        with emu._lock:
            emu.token_requests += 1
        form = dict(parse_qsl(self._body(1 << 16).decode()))
        grant = form.get("grant_type")
        if grant == "refresh_token":
            if form.get("client_id") != emu.client_id or form.get("client_secret") != emu.client_secret:
                return self._send_json(401, {"error": "invalid_client", "error_description": "Unauthorized"})
            if form.get("refresh_token") != emu.refresh_token:
                return self._send_json(400, {"error": "invalid_grant",
                                             "error_description": "Token has been expired or revoked."})
        elif grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            if not _jwt_claims(form.get("assertion", "")).get("iss"):
                return self._send_json(400, {"error": "invalid_grant", "error_description": "Invalid JWT"})
        else:
            return self._send_json(400, {"error": "unsupported_grant_type"})
        body = {"access_token": emu.issue_token(), "expires_in": emu.token_lifetime, "token_type": "Bearer",
                "scope": "https://www.googleapis.com/auth/drive"}
        self._send_json(200, body)

    # metadata
    def _list(self, query: dict[str, str]) -> None:
        emu = self.emu
        test = emu._query(query.get("q"))
        size = min(int(query.get("maxResults") or emu.page_size), emu.page_size)  # Drive may return fewer
        start = int(query.get("pageToken") or 0)
        with emu._lock:
            matches = [f for f in emu._files.values() if f.id != emu.root_id and test(f)]
            page = [emu._json(f) for f in matches[start:start + size]]
        body: dict = {"kind": "drive#fileList", "items": page}
        if start + size < len(matches):
            body["nextPageToken"] = str(start + size)
        self._send_json(200, body)

    def _insert(self, meta: dict, content: bytes | None) -> None:
        emu = self.emu
        parents = [p["id"] for p in meta.get("parents") or []] or ["root"]
        mime = meta.get("mimeType") or "application/octet-stream"
        with emu._lock:
            if content and emu.quota_used() + len(content) > emu.quota_bytes:
                raise _ApiError(*ERROR_FAULTS["quota"])
            f = emu._create(meta.get("title") or "Untitled", mime, parents[0], content or b"")
            f.parents = [emu._parent(p) for p in parents]
            self._send_json(200, emu._json(f))

    def _file(self, file_id: str, action: str | None, query: dict[str, str]) -> None:
        emu, method = self.emu, self.command
        with emu._lock:
            f = emu._get(file_id)
            if action and method == "POST":
                emu._set_trashed(f, action == "/trash")
                return self._send_json(200, emu._json(f))
            if method == "DELETE" and not action:
                emu._remove(f)
                return self._send(204)
            if method in ("PATCH", "PUT") and not action:
                return self._patch(f, self._json_body(), query)
            if method != "GET" or action:
                raise _ApiError(405, "methodNotAllowed", "Method Not Allowed")
            if query.get("alt") != "media":
                return self._send_json(200, emu._json(f))
            if f.is_folder or f.blob is None:
                raise _ApiError(403, "fileNotDownloadable", "Only files with binary content can be downloaded")
            blob, size = f.blob, f.size
        self._media(blob, size)

    def _patch(self, f: _File, meta: dict, query: dict[str, str]) -> None:
        emu = self.emu
        if "title" in meta:
            f.title = meta["title"]
        if "parents" in meta:
            f.parents = [emu._parent(p["id"]) for p in meta["parents"]]
        for pid in filter(None, query.get("addParents", "").split(",")):
            pid = emu._parent(pid)
            if pid not in f.parents:
                f.parents.append(pid)
        for pid in filter(None, query.get("removeParents", "").split(",")):
            pid = emu.root_id if pid == "root" else pid
            f.parents = [p for p in f.parents if p != pid]
        if "labels" in meta and "trashed" in meta["labels"]:
            emu._set_trashed(f, bool(meta["labels"]["trashed"]))
        f.modified = emu._now()
        self._send_json(200, emu._json(f))

    def _media(self, blob: str, size: int) -> None:
        start, end, status = 0, size - 1, 200
        if spec := self.headers.get("Range"):
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", spec.strip())
            if not m or (not m[1] and not m[2]):
                raise _ApiError(400, "badRange", "Invalid Range header")
            if m[1]:
                start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
            else:
                start = max(0, size - int(m[2]))
            if start >= size or start > end:
                raise _ApiError(416, "requestedRangeNotSatisfiable", "Requested range not satisfiable")
            status = 206
        length = max(0, end - start + 1)
        self._drain()
        self._rec.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self._cut is not None:
            length = min(length, self._cut)
        with open(blob, "rb") as fh:
            fh.seek(start)
            while length:
                piece = fh.read(min(length, _PIECE))
                self.wfile.write(piece)
                length -= len(piece)
        if self._cut is not None:
            self.wfile.flush()
            self._reset()

    # uploads
    def _upload(self, target: str | None, query: dict[str, str]) -> None:
        emu, kind = self.emu, query.get("uploadType")
        if "upload_id" in query:
            with emu._lock:
                sess = emu._sessions.get(query["upload_id"])
            if sess is None:
                raise _ApiError(404, "notFound", "Upload session not found or expired")
            if self.command == "DELETE":
                with emu._lock:
                    emu._sessions.pop(sess.id, None)
                with contextlib.suppress(OSError):
                    os.remove(sess.path)
                return self._send(499)
            return self._session_put(sess)
        expected = "PUT" if target else "POST"
        if self.command != expected:
            raise _ApiError(405, "methodNotAllowed", "Method Not Allowed")
        if kind == "resumable":
            return self._start_session(target, self._json_body())
        if kind == "multipart":
            meta, content = self._multipart()
        elif kind == "media":
            meta, content = {}, self._body()
        else:
            raise _ApiError(400, "invalid", f"Invalid uploadType {kind!r}")
        if target is None:
            return self._insert(meta, content)
        blob = emu._blob_path(secrets.token_hex(8))
        with open(blob, "wb") as fh:
            fh.write(content)
        self._finish_update(target, meta, blob, len(content), hashlib.md5(content).hexdigest())

    def _multipart(self) -> tuple[dict, bytes]:
        ctype = self.headers.get("Content-Type", "")
        m = re.search(r'boundary="?([^";]+)"?', ctype)
        if not m:
            raise _ApiError(400, "badContent", "multipart body without boundary")
        parts = []
        for chunk in self._body().split(b"--" + m[1].encode())[1:]:
            if chunk.startswith(b"--"):
                break
            _, _, content = chunk.partition(b"\r\n\r\n")
            if not _:
                _, _, content = chunk.partition(b"\n\n")
            parts.append(content[:-2] if content.endswith(b"\r\n") else content.rstrip(b"\n"))
        if len(parts) != 2:
            raise _ApiError(400, "badContent", "multipart body needs metadata and media parts")
        return json.loads(parts[0] or b"{}"), parts[1]

    def _start_session(self, target: str | None, meta: dict) -> None:
        emu = self.emu
        total = self.headers.get("X-Upload-Content-Length")
        with emu._lock:
            if target is not None:
                emu._get(target)
            else:
                for p in meta.get("parents") or []:
                    emu._parent(p["id"])
            if total is not None and emu.quota_used() + int(total) > emu.quota_bytes:
                raise _ApiError(*ERROR_FAULTS["quota"])
            sid = secrets.token_urlsafe(18)
            sess = _Session(sid, meta, target, emu._blob_path("upload-" + sid))
            emu._sessions[sid] = sess
        open(sess.path, "wb").close()
        where = f"upload/drive/v2/files{'/' + target if target else ''}?uploadType=resumable&upload_id={sid}"
        self._send(200, headers={"Location": emu.url + where})

    def _session_put(self, sess: _Session) -> None:
        emu = self.emu
        spec = (self.headers.get("Content-Range") or f"bytes 0-{self._remaining - 1}/{self._remaining}").strip()
        m = re.fullmatch(r"bytes (?:\*|(\d+)-(\d+))/(\*|\d+)", spec)
        if not m:
            raise _ApiError(400, "badContentRange", f"Invalid Content-Range: {spec}")
        total = None if m[3] == "*" else int(m[3])
        with sess.lock:
            if sess.done is not None:
                return self._send_done(sess)
            if m[1] is None:  # a status query
                self._drain()
                if total is not None and total == sess.received:
                    return self._finish(sess)
                return self._send_incomplete(sess)
            start, end = int(m[1]), int(m[2])
            if end - start + 1 != self._remaining or start > sess.received:
                raise _ApiError(400, "badContentRange", f"Content-Range {spec} does not fit {sess.received} received")
            if total is None and (end + 1) % UPLOAD_GRANULE:
                raise _ApiError(400, "badContentRange", "Non-final chunks must be multiples of 256 KiB")
            if total is not None and end + 1 > total:
                raise _ApiError(400, "badContentRange", f"Content-Range {spec} past the total")
            with emu._lock:
                if emu.quota_used() + end + 1 > emu.quota_bytes:
                    raise _ApiError(*ERROR_FAULTS["quota"])
            self._receive(sess, start, self._remaining)
            if total is not None and sess.received == total:
                return self._finish(sess)
            self._send_incomplete(sess)

    def _receive(self, sess: _Session, start: int, limit: int) -> None:
        """Append the body's new bytes to the session; overlap with what it has is skipped."""
        skip = sess.received - start
        while skip > 0 and limit > 0:
            got = len(self._read(min(skip, limit, _PIECE)))
            skip, limit = skip - got, limit - got
        with open(sess.path, "ab") as fh:
            while limit > 0:
                piece = self.rfile.read(min(limit, _PIECE, self._remaining))
                if not piece:
                    self._remaining = 0
                    raise ConnectionResetError("client went away mid-chunk")
                self._remaining -= len(piece)
                limit -= len(piece)
                fh.write(piece)
                sess.md5.update(piece)  # type: ignore[attr-defined]
                sess.received += len(piece)

    def _send_incomplete(self, sess: _Session) -> None:
        headers = {"Range": f"bytes=0-{sess.received - 1}"} if sess.received else {}
        self._send(308, headers=headers)

    def _finish(self, sess: _Session) -> None:
        emu, md5 = self.emu, sess.md5.hexdigest()  # type: ignore[attr-defined]
        if sess.target is not None:
            return self._finish_update(sess.target, sess.meta, sess.path, sess.received, md5, sess)
        meta = sess.meta
        parents = [p["id"] for p in meta.get("parents") or []] or ["root"]
        with emu._lock:
            blob = emu._blob_path("blob-" + sess.id)
            os.replace(sess.path, blob)
            f = emu._create(meta.get("title") or "Untitled", meta.get("mimeType") or "application/octet-stream",
                            parents[0], None, blob=blob, md5=md5, size=sess.received)
            f.parents = [emu._parent(p) for p in parents]
            sess.done = f.id
        self._send_done(sess)

    def _finish_update(self, target: str, meta: dict, path: str, size: int, md5: str,
                       sess: _Session | None = None) -> None:
        emu = self.emu
        with emu._lock:
            f = emu._get(target)
            old = f.blob
            f.blob = emu._blob_path("blob-" + secrets.token_hex(8))
            os.replace(path, f.blob)
            f.size, f.md5, f.modified = size, md5, emu._now()
            if meta.get("title"):
                f.title = meta["title"]
            if sess is not None:
                sess.done = f.id
            if old:
                with contextlib.suppress(OSError):
                    os.remove(old)
            self._send_json(200, emu._json(f))

    def _send_done(self, sess: _Session) -> None:
        self._drain()
        with self.emu._lock:
            f = self.emu._files.get(sess.done or "")
            if f is None:
                raise _ApiError(404, "notFound", "The uploaded file is gone")
            self._send_json(200, self.emu._json(f))

    def _drop(self, fault: Fault, path: str, query: dict[str, str]) -> None:
        sess = self.emu._sessions.get(query.get("upload_id", ""))
        m = re.fullmatch(r"bytes (\d+)-\d+/(\*|\d+)", (self.headers.get("Content-Range") or "").strip())
        try:
            if sess is not None and m and self.command == "PUT" and int(m[1]) <= sess.received:
                with sess.lock:
                    self._receive(sess, int(m[1]), min(fault.after_bytes, self._remaining))
            else:
                self._read(min(fault.after_bytes, self._remaining))
        except ConnectionError:
            pass
        self._reset()


_RUNNING: dict[int, DriveEmulator] = {}


def emulated_drive_store(tmp_path: os.PathLike[str] | str, url: str = "gdrive://nbguard/contract", **options):
    """A DriveStore on a fresh emulator, for store-contract suites; release it with ``stop_emulated_drive_store``."""
    from nbguard.stores.drive import DriveStore, RetryPolicy

    emu = DriveEmulator().start()
    options = {"chunk_size": 1 << 20, "retry": RetryPolicy(attempts=5, base_delay=0.001, max_delay=0.005),
               "cache_dir": os.path.join(os.fspath(tmp_path), "drive-cache"), **options}
    store = DriveStore(url, credentials=emu.authorized_user_info(), api_root=emu.url, **options)
    _RUNNING[id(store)] = emu
    return store


def stop_emulated_drive_store(store: object) -> None:
    emu = _RUNNING.pop(id(store), None)
    if emu is not None:
        emu.stop()


def _jwt_claims(assertion: str) -> dict:
    try:
        payload = assertion.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
