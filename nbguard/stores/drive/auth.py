"""Google credentials for Drive: where they come from, and the bridge that lets pydrive2 use them.

Sources, first found wins: the ``credentials=`` argument; ``NBGUARD_DRIVE_CREDENTIALS`` (the path
of a JSON file, or the JSON text); on Kaggle the notebook secret of that name; on Colab the secret of
that name, else the notebook user's own login (``google.colab.auth``). No browser flows.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import google.auth
import google.auth.credentials
import google.auth.exceptions
import google.oauth2.credentials
import google.oauth2.service_account
import google_auth_httplib2
import httplib2

from ...errors import StoreError, UsageError
from .retry import CREDENTIALS_FIX

log = logging.getLogger("nbguard.stores.drive")

DRIVE_SCOPE = "https://www.googleapis.com/auth/drive"
CREDENTIALS_ENV = "NBGUARD_DRIVE_CREDENTIALS"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
SERVICE_ACCOUNT_WARNING = (
    "nbguard: Drive credentials are a service account. Service accounts have no Drive storage quota of "
    "their own: uploads into a personal My Drive fail with storageQuotaExceeded. Use a folder in a shared "
    "drive the service account belongs to (gdrive://<folder id>), or an authorized-user JSON instead."
)

Credentials = google.auth.credentials.Credentials


def load_credentials(credentials: Any = None) -> Credentials:
    """google-auth credentials for Drive from the first source that has some (see the module doc)."""
    if credentials is not None:
        return credentials_from(credentials, "the credentials argument")
    text = os.environ.get(CREDENTIALS_ENV, "")
    if text.strip():
        return credentials_from(text, f"${CREDENTIALS_ENV}")
    if "KAGGLE_KERNEL_RUN_TYPE" in os.environ:  # before Colab: Kaggle's image also looks like Colab
        return _from_kaggle()
    if _on_colab():
        return _from_colab()
    raise StoreError(f"no Google Drive credentials were found: {CREDENTIALS_FIX}")


def credentials_from(obj: Any, source: str) -> Credentials:
    """Credentials from a google-auth object, a parsed JSON mapping, JSON text, or a JSON file path."""
    if isinstance(obj, Credentials):
        return google.auth.credentials.with_scopes_if_required(obj, [DRIVE_SCOPE])
    if isinstance(obj, Mapping):
        return credentials_from_info(obj, source)
    if isinstance(obj, (str, os.PathLike)):
        return credentials_from_info(_read_json(os.fspath(obj), source), source)
    raise UsageError(f"{source} must be google-auth credentials, a JSON mapping, JSON text or a file path, "
                     f"not {type(obj).__name__}")


def credentials_from_info(info: Mapping[str, Any], source: str) -> Credentials:
    """Credentials from an authorized-user or service-account JSON mapping."""
    kind = info.get("type")
    if kind == "service_account" or "private_key" in info:
        return _service_account(info, source)
    if kind == "authorized_user" or "refresh_token" in info:
        return _authorized_user(info, source)
    if "installed" in info or "web" in info:
        raise StoreError(f"{source} is an OAuth client file (client secrets), not credentials: {CREDENTIALS_FIX}")
    raise StoreError(f"{source} holds neither authorized-user nor service-account credentials "
                     f"(type {str(kind)[:40]!r}): {CREDENTIALS_FIX}")


def _read_json(text: str, source: str) -> Mapping[str, Any]:
    if not text.lstrip().startswith(("{", "[")):
        path = os.path.expanduser(text.strip())
        if not os.path.isfile(path):
            # The text is not echoed: a misplaced token would end up in the message.
            raise StoreError(f"{source} is neither JSON text nor the path of an existing file: {CREDENTIALS_FIX}")
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise StoreError(f"the credentials file named by {source} cannot be read ({exc.strerror})") from None
    try:
        info = json.loads(text)
    except ValueError as exc:
        msg = getattr(exc, "msg", "invalid JSON")
        raise StoreError(f"{source} is not valid JSON ({msg}): {CREDENTIALS_FIX}") from None
    if not isinstance(info, dict):
        raise StoreError(f"{source} is not a JSON object: {CREDENTIALS_FIX}")
    return info


def _authorized_user(info: Mapping[str, Any], source: str) -> Credentials:
    missing = sorted({"client_id", "client_secret", "refresh_token"} - {k for k, v in info.items() if v})
    if missing:
        raise StoreError(f"{source} lacks {', '.join(missing)}: {CREDENTIALS_FIX}")
    token_uri = info.get("token_uri") or GOOGLE_TOKEN_URI
    check_endpoint(token_uri, "the token_uri of the credentials")
    expiry = _parse_expiry(info.get("expiry")) if info.get("token") else None
    # Built by hand: google-auth's from_authorized_user_info ignores token_uri.
    return google.oauth2.credentials.Credentials(
        token=info.get("token"), refresh_token=info["refresh_token"], token_uri=token_uri,
        client_id=info["client_id"], client_secret=info["client_secret"], scopes=info.get("scopes"),
        expiry=expiry, quota_project_id=info.get("quota_project_id"),
    )


def _service_account(info: Mapping[str, Any], source: str) -> Credentials:
    missing = sorted({"client_email", "private_key", "token_uri"} - {k for k, v in info.items() if v})
    if missing:
        raise StoreError(f"{source} is a service-account file that lacks {', '.join(missing)}")
    check_endpoint(info["token_uri"], "the token_uri of the credentials")
    try:
        creds = google.oauth2.service_account.Credentials.from_service_account_info(dict(info), scopes=[DRIVE_SCOPE])
    except ValueError:
        raise StoreError(f"the private key in {source} cannot be read: download a new key for the service "
                         "account") from None
    warnings.warn(SERVICE_ACCOUNT_WARNING, UserWarning, stacklevel=4)
    return creds


def _parse_expiry(text: Any) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    # google-auth compares expiry with naive UTC datetimes
    return when.astimezone(timezone.utc).replace(tzinfo=None) if when.tzinfo else when


def check_endpoint(url: str, what: str) -> str:
    """Refuse to send credentials anywhere but https, or plain http on this machine (an emulator)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"{what} must be an http(s) URL, not {url!r}")
    if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
        raise UsageError(f"{what} uses plain http to {parts.hostname}, which would send credentials "
                         "unencrypted: use https (plain http is only allowed for 127.0.0.1/localhost)")
    return url


def _on_colab() -> bool:
    if "google.colab" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):
        return False


def _from_kaggle() -> Credentials:
    try:
        from kaggle_secrets import UserSecretsClient
    except ImportError:
        raise StoreError(f"no Google Drive credentials were found: {CREDENTIALS_FIX}") from None
    try:
        text = UserSecretsClient().get_secret(CREDENTIALS_ENV)
    except Exception:  # kaggle_secrets raises its own types for a missing or detached secret
        text = None
    if not text:
        raise StoreError(f"the Kaggle secret {CREDENTIALS_ENV} is missing: add it under Add-ons > Secrets with the "
                         "authorized-user JSON, attach it to this notebook, and turn Internet on in the settings")
    return credentials_from(text, f"the Kaggle secret {CREDENTIALS_ENV}")


def _from_colab() -> Credentials:
    from google.colab import userdata

    try:
        text = userdata.get(CREDENTIALS_ENV)
    except Exception:  # SecretNotFoundError, NotebookAccessError: fall back to the user's own login
        text = None
    if text:
        return credentials_from(text, f"the Colab secret {CREDENTIALS_ENV}")
    from google.colab import auth as colab_auth

    colab_auth.authenticate_user()
    try:
        creds, _ = google.auth.default(scopes=[DRIVE_SCOPE])
    except google.auth.exceptions.DefaultCredentialsError:
        raise StoreError(f"Colab did not provide Google credentials after sign-in: {CREDENTIALS_FIX}") from None
    return creds


class OAuth2Bridge:
    """google-auth credentials in the shape pydrive2 expects of oauth2client's.

    pydrive2 asks ``access_token_expired`` before each call and ``authorize(http)`` for an HTTP
    object; google-auth refreshes by itself (before a request and on a 401), so the token never
    counts as expired here.
    """

    def __init__(self, credentials: Credentials):
        self.credentials = credentials

    def __repr__(self) -> str:
        return f"<OAuth2Bridge {type(self.credentials).__module__}.{type(self.credentials).__name__}>"

    @property
    def access_token_expired(self) -> bool:
        return False

    def authorize(self, http: httplib2.Http) -> google_auth_httplib2.AuthorizedHttp:
        return google_auth_httplib2.AuthorizedHttp(self.credentials, http=http)

    def refresh(self, http: httplib2.Http) -> None:
        self.credentials.refresh(google_auth_httplib2.Request(http))

    def set_store(self, store: object) -> None:
        """pydrive2 hands oauth2client storage here; nbguard never stores tokens."""
