"""Moving bytes: resumable chunked uploads and ranged downloads, both resuming after failures.

An upload streams a chunks iterable into requests of ``chunk_size`` bytes and holds at most one
request's worth in memory. After a failure it asks the server how much it has
(``Content-Range: bytes */N``) and goes on from there; Drive creates the file only when the last
byte arrives, so no reader ever sees a partial file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import quote as urlquote

from ...errors import StoreError
from . import retry
from .client import DriveClient
from .retry import DriveHTTPError

log = logging.getLogger("nbguard.stores.drive")

UPLOAD_GRANULE = 256 * 1024  # Drive wants every chunk but the last to be a multiple of this
DEFAULT_CHUNK_SIZE = 8 << 20
OCTET = "application/octet-stream"
Progress = Callable[[int], None]


class ParentGoneError(StoreError):
    """The folder an upload targets no longer exists (a stale folder-id cache)."""


@dataclass
class Block:
    """One upload request's bytes, at ``start`` in the file; ``last`` closes the upload."""

    data: bytearray
    start: int
    last: bool

    @property
    def end(self) -> int:
        return self.start + len(self.data)


class _Tally:
    """Size and md5 of what an upload sent, to compare with what Drive stored."""

    def __init__(self) -> None:
        self.md5, self.size = hashlib.md5(), 0

    def update(self, data: bytearray) -> None:
        self.md5.update(data)
        self.size += len(data)


def blocks(chunks: Iterable[Any], size: int, tally: _Tally | None = None) -> Iterator[Block]:
    """Cut an iterable of buffers into blocks of exactly ``size`` bytes (the last may be shorter).

    Buffers are copied into the block as they come, and the next one is pulled only when the current
    one is used up, so a producer may reuse its buffer after each yield.
    """
    it = iter(chunks)
    start, pending = 0, memoryview(b"")
    while True:
        buf, filled = bytearray(size), 0
        while filled < size:
            if not pending:
                item = next(it, None)
                if item is None:
                    break
                pending = memoryview(item).cast("B")
                continue
            take = min(size - filled, len(pending))
            buf[filled:filled + take] = pending[:take]
            filled += take
            pending = pending[take:]
        while filled == size and not pending:  # full: is anything left to send after it?
            item = next(it, None)
            if item is None:
                break
            pending = memoryview(item).cast("B")
        last = not pending
        if filled < size:
            del buf[filled:]
        if tally is not None:
            tally.update(buf)
        yield Block(buf, start, last)
        if last:
            return
        start += len(buf)


def upload(client: DriveClient, title: str, parent_id: str, chunks: Iterable[Any], *,
           chunk_size: int = DEFAULT_CHUNK_SIZE, progress: Progress | None = None) -> dict[str, Any]:
    """Create a file from ``chunks`` with a resumable upload; returns its metadata (size and md5 checked)."""
    doing = f"uploading {title} to Google Drive"
    url = f"{client.api_root}upload/drive/v2/files?uploadType=resumable&supportsAllDrives=true"
    meta = json.dumps({"title": title, "parents": [{"id": parent_id}], "mimeType": OCTET}).encode()
    headers = {"Content-Type": "application/json; charset=UTF-8", "X-Upload-Content-Type": OCTET}

    def start() -> str:
        resp, _ = client.send("POST", url, meta, headers)
        if not resp.get("location"):
            raise DriveHTTPError(resp.status, "noUploadLocation")
        return resp["location"]

    session = client.call(start, doing, missing_ok=True)
    if session is None:
        raise ParentGoneError(f"the Drive folder for {title} disappeared while uploading it: save again")
    tally = _Tally()
    try:
        result = _send_blocks(client, session, blocks(chunks, chunk_size, tally), progress, doing)
    except BaseException:
        _cancel(client, session)
        raise
    if int(result.get("fileSize", -1)) != tally.size or result.get("md5Checksum") != tally.md5.hexdigest():
        client.delete(result["id"])
        raise StoreError(f"Google Drive stored different bytes than were sent for {title}: save again")
    return result


def _send_blocks(client: DriveClient, session: str, source: Iterator[Block], progress: Progress | None,
                 doing: str) -> dict[str, Any]:
    acked = 0  # bytes the server has confirmed
    for block in source:
        result = _send_block(client, session, block, acked, progress, doing)
        if isinstance(result, dict):
            return result
        acked = result
    raise StoreError(f"an upload ended without Drive confirming the file while {doing}: save again")


def _send_block(client: DriveClient, session: str, block: Block, acked: int, progress: Progress | None,
                doing: str) -> int | dict[str, Any]:
    """Send one block, resuming as needed: the new acknowledged offset, or the file's metadata."""
    total = block.end if block.last else None
    failures, query = 0, False
    while True:
        if acked < block.start:
            raise StoreError(f"Google Drive lost part of an upload while {doing}: save again")
        try:
            resp, content = _query(client, session, total) if query else _put(client, session, block, acked)
        except Exception as exc:
            client.forget_http(exc)
            if retry.is_missing(exc):
                raise StoreError(f"the Drive upload session expired while {doing}: save again") from exc
            failures += 1
            if not retry.is_transient(exc) or failures >= client.retry.attempts:
                retry.raise_store_error(exc, doing, failures)
            err = retry.as_http_error(exc)
            delay = client.retry.backoff(failures, err.retry_after if err else None)
            log.info("Drive: upload chunk at %d failed (%s); asking where to resume in %.2f s",
                     acked, retry.describe(exc), delay)
            time.sleep(delay)
            query = True  # ask the server how much it has before sending again
            continue
        was_query, query = query, False
        if resp.status in (200, 201):
            if not block.last:
                raise StoreError(f"Google Drive closed an upload early while {doing}: save again")
            _advance(progress, block.end - acked)
            return json.loads(content)
        confirmed = _confirmed(resp)
        if confirmed > acked:
            _advance(progress, confirmed - acked)
            acked, failures = confirmed, 0
        elif not was_query:
            failures += 1  # a 308 without progress: do not loop forever
            if failures >= client.retry.attempts:
                raise StoreError(f"Google Drive stopped accepting data while {doing}: save again")
        if acked >= block.end and not block.last:
            return acked


def _put(client: DriveClient, session: str, block: Block, acked: int):
    body = memoryview(block.data)[acked - block.start:]
    total = str(block.end) if block.last else "*"
    spec = f"bytes {acked}-{block.end - 1}/{total}" if body else f"bytes */{total}"
    headers = {"Content-Range": spec, "Content-Length": str(len(body)), "Content-Type": OCTET}
    return client.send("PUT", session, body, headers, ok=(200, 201, 308))


def _query(client: DriveClient, session: str, total: int | None):
    headers = {"Content-Range": f"bytes */{'*' if total is None else total}", "Content-Length": "0"}
    return client.send("PUT", session, b"", headers, ok=(200, 201, 308))


def _confirmed(resp: Any) -> int:
    """Bytes the server holds, from a 308's ``Range: bytes=0-N`` (none when absent)."""
    spec = resp.get("range", "")
    if not spec:
        return 0
    try:
        return int(spec.rpartition("-")[2]) + 1
    except ValueError:
        raise StoreError(f"Google Drive sent an unreadable upload Range header {spec!r}") from None


def _cancel(client: DriveClient, session: str) -> None:
    try:
        client.send("DELETE", session, ok=(200, 204, 404, 410, 499))
    except Exception as exc:  # best effort: an abandoned session expires by itself
        log.debug("Drive: cancelling an upload session failed (%s)", retry.describe(exc))


def _advance(progress: Progress | None, n: int) -> None:
    if progress is not None and n > 0:
        progress(n)


def download(client: DriveClient, meta: dict[str, Any], sink: BinaryIO, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
             progress: Progress | None = None) -> None:
    """Stream a file's bytes into ``sink`` with Range requests; checks the size and md5 Drive reports."""
    title, size, expected = meta.get("title", meta["id"]), int(meta.get("fileSize", 0)), meta.get("md5Checksum")
    doing = f"downloading {title} from Google Drive"
    url = f"{client.api_root}drive/v2/files/{urlquote(meta['id'], safe='')}?alt=media&supportsAllDrives=true"
    digest, offset = hashlib.md5(), 0
    while offset < size:
        end = min(offset + chunk_size, size) - 1
        data = client.call(functools.partial(_range, client, url, offset, end), doing)
        sink.write(data)
        digest.update(data)
        offset += len(data)
        _advance(progress, len(data))
    if expected and digest.hexdigest() != expected:
        raise StoreError(f"{title} from Google Drive does not match its md5 checksum: load it again")


class ShortRead(ConnectionError):
    """A ranged response shorter than asked for (a dropped connection); retried."""


def _range(client: DriveClient, url: str, start: int, end: int) -> bytes:
    headers = {"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
    resp, content = client.send("GET", url, headers=headers, ok=(200, 206))
    if resp.status == 200:  # the server ignored Range and sent everything
        content = content[start:end + 1]
    if len(content) != end - start + 1:
        raise ShortRead(f"got {len(content)} of {end - start + 1} bytes")
    return content
