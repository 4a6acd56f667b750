"""Stores: the folders snapshots live in (the contract in ``base``, one module per backend,
``registry`` to open one from a location; Google Drive in ``drive``, staging in ``replica``)."""

from __future__ import annotations

from .base import Buffer, EventHook, FileInfo, Progress, Store, check_relative, describe_os_error
from .fsspec_store import FsspecStore
from .local import LocalStore
from .memory import MemoryStore
from .owner import TEMP_PREFIX
from .registry import mount_prefixes, open_store, register_scheme, staging_folder

__all__ = [
    "TEMP_PREFIX",
    "Buffer",
    "EventHook",
    "FileInfo",
    "FsspecStore",
    "LocalStore",
    "MemoryStore",
    "Progress",
    "Store",
    "check_relative",
    "describe_os_error",
    "mount_prefixes",
    "open_store",
    "register_scheme",
    "staging_folder",
]
