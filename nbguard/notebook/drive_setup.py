"""``%nbguard drive``: keep this notebook's snapshots in Google Drive through its API."""

from __future__ import annotations

from typing import Any

from ..humanize import size as human_size
from ..stores import open_store
from ..stores.base import HasQuota, Staged


def connect(session: Any, folder: str | None = None) -> str:
    """Point the session's default store at a Drive folder (staged locally, uploaded in the
    background) and check that Drive answers. Returns the line to show."""
    folder = (folder or f"nbguard/{session.notebook}").strip("/")
    url = folder if "://" in folder else f"gdrive://{folder}"
    store = open_store(url)
    remote = store.remote if isinstance(store, Staged) else store
    used, total = remote.quota() if isinstance(remote, HasQuota) else (0, 0)
    session.default_dir = url
    session.place_text = "in Google Drive through its API: saved on this machine first, then uploaded and verified"
    quota = f"{human_size(used)} of {human_size(total)} used" if total else f"{human_size(used)} used"
    return (f"nbguard: snapshots of this notebook now go to Google Drive, folder {folder} ({quota}). "
            "Each one is saved on this machine first and shows 'verified' once Drive has it.")
