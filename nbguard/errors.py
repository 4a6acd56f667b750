"""The errors nbguard raises. Every message says what to do next.

    NbguardError
    ├── CaptureError        a value or object cannot be captured
    │   └── StaleCaptureError  a tensor changed unseen by its version counter: the save is retaken
    ├── SnapshotError       a snapshot is missing, corrupt or of an unknown format
    │   └── CorruptSnapshotError   a hash, size or structure check failed
    ├── RestoreError        a snapshot does not fit the live objects
    ├── StoreError          the storage place failed (disk full, permission, gone)
    └── UsageError          bad options or arguments from the user
"""

from __future__ import annotations


class NbguardError(Exception):
    """Base of every error nbguard raises on purpose."""


class CaptureError(NbguardError):
    """A value cannot be stored safely (nbguard never pickles)."""


class StaleCaptureError(CaptureError):
    """A tensor staging reused changed behind torch's version counter (a native kernel, ``.data``, a
    raw pointer): the snapshot was not committed. ``save(wait=True)`` retakes it at once; otherwise
    the next safe point does. The tensor is copied at every save until one finds it unchanged."""


class SnapshotError(NbguardError):
    """A snapshot cannot be found or read."""


class CorruptSnapshotError(SnapshotError):
    """A snapshot failed a hash, size or structure check."""


class RestoreError(NbguardError):
    """A snapshot does not fit the objects it should be restored into."""


class StoreError(NbguardError):
    """The storage place failed: disk full, permission denied, folder gone, remote error."""


class UsageError(NbguardError):
    """Bad options or arguments."""
