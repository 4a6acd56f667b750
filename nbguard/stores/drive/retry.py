"""Which Drive failures are worth another try, how long to wait, and what to tell the user."""

from __future__ import annotations

import http.client
import json
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import google.auth.exceptions
import httplib2
from googleapiclient.errors import HttpError
from pydrive2.files import ApiRequestError

from ...errors import StoreError

log = logging.getLogger("nbguard.stores.drive")
T = TypeVar("T")

RATE_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
QUOTA_REASONS = frozenset({"storageQuotaExceeded", "quotaExceeded", "teamDriveFileLimitExceeded"})
CREDENTIALS_FIX = (
    "create a fresh authorized-user JSON (client_id, client_secret, refresh_token) and put its path or "
    "text in NBGUARD_DRIVE_CREDENTIALS (on Colab or Kaggle: a notebook secret of that name); refresh tokens "
    "of OAuth apps in 'Testing' status expire after 7 days"
)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter: ``attempts`` tries in all, waits capped at ``max_delay``."""

    attempts: int = 8
    base_delay: float = 1.0
    max_delay: float = 32.0

    def backoff(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure (1-based)."""
        delay = min(self.max_delay, self.base_delay * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
        if retry_after:
            delay = max(delay, min(retry_after, self.max_delay))
        return delay


class DriveHTTPError(Exception):
    """An error answer from Drive: the HTTP status and the first error reason."""

    def __init__(self, status: int, reason: str = "", retry_after: float | None = None):
        super().__init__(f"HTTP {status}" + (f" ({reason})" if reason else ""))
        self.status, self.reason, self.retry_after = status, reason, retry_after

    @classmethod
    def from_response(cls, resp: httplib2.Response | dict, content: bytes | str | None) -> DriveHTTPError:
        status = int(getattr(resp, "status", 0) or resp.get("status", 0))
        reason = ""
        try:
            err = json.loads(content or b"{}").get("error", {})
            if isinstance(err, dict):
                reason = (err.get("errors") or [{}])[0].get("reason", "") or str(err.get("status", ""))
            elif isinstance(err, str):
                reason = err
        except (ValueError, AttributeError, IndexError):
            pass
        retry_after = None
        header = resp.get("retry-after")
        try:
            retry_after = float(header) if header else None
        except (TypeError, ValueError):
            pass
        return cls(status, reason, retry_after)


def as_http_error(exc: BaseException) -> DriveHTTPError | None:
    """The Drive error answer behind an exception from pydrive2, googleapiclient or our own calls."""
    if isinstance(exc, DriveHTTPError):
        return exc
    if isinstance(exc, ApiRequestError) and exc.args and isinstance(exc.args[0], HttpError):
        exc = exc.args[0]
    elif isinstance(exc, ValueError) and isinstance(exc.__context__, HttpError):
        exc = exc.__context__  # pydrive2 failed to parse a non-JSON error body (a proxy's HTML page)
    if isinstance(exc, HttpError):
        return DriveHTTPError.from_response(exc.resp, exc.content)
    return None


def is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, (OSError, httplib2.HttpLib2Error, http.client.HTTPException,
                            google.auth.exceptions.TransportError))


def is_transient(exc: BaseException) -> bool:
    """Worth another try: 5xx, 429, rate-limit 403s, connection trouble, retryable token refreshes."""
    err = as_http_error(exc)
    if err is not None:
        return err.status >= 500 or err.status == 429 or (err.status == 403 and err.reason in RATE_REASONS)
    if isinstance(exc, google.auth.exceptions.RefreshError):
        return bool(getattr(exc, "retryable", False))
    return is_connection_error(exc)


def is_missing(exc: BaseException) -> bool:
    err = as_http_error(exc)
    return err is not None and err.status in (404, 410)


def store_error(exc: BaseException, doing: str, attempts: int = 1) -> StoreError:
    """A plain StoreError for a failure while ``doing`` something, saying what to do next."""
    after = f" after {attempts} attempts" if attempts > 1 else ""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, google.auth.exceptions.RefreshError):
        details = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
        code = str(details.get("error", ""))
        code = f" ({code})" if re.fullmatch(r"[a-z_]{1,40}", code) else ""  # only a known-safe error code
        return StoreError(f"Google refused to refresh the Drive access token{code} while {doing}: {CREDENTIALS_FIX}")
    if isinstance(exc, google.auth.exceptions.GoogleAuthError) and not is_connection_error(exc):
        return StoreError(f"the Google credentials could not be used while {doing}: {CREDENTIALS_FIX}")
    err = as_http_error(exc)
    if err is None:
        return StoreError(f"Google Drive could not be reached while {doing}{after} "
                          f"({type(exc).__name__}): check the network connection and try again")
    if err.reason in QUOTA_REASONS:
        return StoreError(f"Google Drive is full ({err.reason}) while {doing}: free space in Drive and empty its "
                          "trash, or use another account or a shared drive; service accounts have no storage "
                          "of their own and need a folder in a shared drive")
    if err.status == 401:
        return StoreError(f"Google Drive rejected the credentials (HTTP 401) while {doing}: {CREDENTIALS_FIX}")
    if err.status in (429, 403) and (err.status == 429 or err.reason in RATE_REASONS):
        return StoreError(f"Google Drive kept rate-limiting requests ({err.reason or 'HTTP 429'}) while {doing}"
                          f"{after}: wait a few minutes, then save again (or save less often)")
    if err.status >= 500:
        return StoreError(f"Google Drive kept failing ({err}) while {doing}{after}: "
                          "it is probably a Drive outage; try again later")
    if err.status == 403:
        return StoreError(f"Google Drive refused access ({err}) while {doing}: check that the credentials have the "
                          "drive scope and can write to the folder")
    if err.status in (404, 410):
        return StoreError(f"Google Drive has no such file or folder ({err}) while {doing}: "
                          "check the gdrive:// folder, or save again")
    return StoreError(f"Google Drive answered {err} while {doing}")


def call(fn: Callable[[], T], policy: RetryPolicy, doing: str, *,
         on_error: Callable[[BaseException], None] | None = None, missing_ok: bool = False) -> T | None:
    """``fn()``, retried on transient failures; None for 404 when ``missing_ok``; StoreError otherwise."""
    failures = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if on_error is not None:
                on_error(exc)
            if missing_ok and is_missing(exc):
                return None
            failures += 1
            if not is_transient(exc) or failures >= policy.attempts:
                raise_store_error(exc, doing, failures)
            err = as_http_error(exc)
            delay = policy.backoff(failures, err.retry_after if err else None)
            log.info("Drive: %s failed (%s); retry %d/%d in %.2f s", doing, describe(exc), failures,
                     policy.attempts - 1, delay)
            time.sleep(delay)


def raise_store_error(exc: BaseException, doing: str, attempts: int = 1) -> NoReturn:
    """Raise ``store_error``; auth failures drop the cause, whose text comes from the token server."""
    error = store_error(exc, doing, attempts)
    if error is exc:
        raise error
    if isinstance(exc, google.auth.exceptions.GoogleAuthError):
        raise error from None
    raise error from exc


def describe(exc: BaseException) -> str:
    """A short, secret-free label of a failure for logs."""
    err = as_http_error(exc)
    return str(err) if err is not None else type(exc).__name__
