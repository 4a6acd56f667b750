"""nbguard: autosave and exact resume of PyTorch training in notebooks.

In a notebook: ``%load_ext nbguard``, then ``%%checkpointed`` on the training cell. In a script::

    @nbguard.checkpointed(every="10m")
    def train(epochs): ...          # same autosave and exact resume, no resume code

or, by hand::

    guard = nbguard.Guard("checkpoints", run="mnist")
    guard.save({"model": model, "opt": opt}, metrics={"loss": loss}, position={"epoch": epoch})
"""

from __future__ import annotations

from .catalog import Catalog, Comparison, GcReport
from .decorator import checkpointed
from .errors import (
    CaptureError,
    CorruptSnapshotError,
    NbguardError,
    RestoreError,
    SnapshotError,
    StoreError,
    UsageError,
)
from .guard import Guard, SaveStats, load
from .manifest import SnapshotInfo
from .place import default_dir
from .retention import Policy
from .snapshot import RestoreReport, Snapshot
from .store import FsspecStore, LocalStore, MemoryStore, Store, open_store
from .version import __version__
from .weights import load_weights
from .writer import SaveHandle

__all__ = [
    "CaptureError",
    "Catalog",
    "Comparison",
    "CorruptSnapshotError",
    "FsspecStore",
    "GcReport",
    "Guard",
    "LocalStore",
    "MemoryStore",
    "NbguardError",
    "Policy",
    "RestoreError",
    "RestoreReport",
    "SaveHandle",
    "SaveStats",
    "Snapshot",
    "SnapshotError",
    "SnapshotInfo",
    "Store",
    "StoreError",
    "UsageError",
    "__version__",
    "checkpointed",
    "default_dir",
    "load",
    "load_ipython_extension",
    "load_weights",
    "open_store",
    "panel",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython) -> None:  # noqa: ANN001 - IPython's shell
    """``%load_ext nbguard``: register the magics and the shutdown handlers."""
    from .magics import load_extension

    load_extension(ipython)


def unload_ipython_extension(ipython) -> None:  # noqa: ANN001
    """``%unload_ext nbguard``: remove everything ``%load_ext`` added."""
    from .magics import unload_extension

    unload_extension(ipython)


def panel(*args, **kwargs):
    """The snapshot panel (an ipywidgets widget); see ``nbguard.ui.Panel``."""
    from .ui import open_panel

    return open_panel(*args, **kwargs)
