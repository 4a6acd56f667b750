"""nbguard: autosave and exact resume of PyTorch training in notebooks.

In a notebook: ``%load_ext nbguard``, then ``%%checkpointed`` on the training cell. In a script::

    @nbguard.checkpointed(every="10m")
    def train(epochs): ...          # same autosave and exact resume, no resume code

or, by hand::

    guard = nbguard.Guard("checkpoints", run="mnist")
    guard.save({"model": model, "opt": opt}, metrics={"loss": loss}, position={"epoch": epoch})
"""

from __future__ import annotations

from .engine.catalog import Catalog
from .engine.collect import GcReport
from .engine.compare import Comparison
from .engine.guard import Guard, load
from .engine.report import RestoreReport
from .engine.retention import Policy
from .engine.saving import SaveStats
from .engine.snapshot import Snapshot
from .engine.weights import load_weights
from .engine.writer import SaveHandle
from .errors import (
    CaptureError,
    CorruptSnapshotError,
    NbguardError,
    RestoreError,
    SnapshotError,
    StoreError,
    UsageError,
)
from .format.manifest import SnapshotInfo
from .stores import FsspecStore, LocalStore, MemoryStore, Store, open_store
from .stores.place import default_dir
from .training.decorator import checkpointed
from .version import __version__

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
    from .notebook.magics import load_extension

    load_extension(ipython)


def unload_ipython_extension(ipython) -> None:  # noqa: ANN001
    """``%unload_ext nbguard``: remove everything ``%load_ext`` added."""
    from .notebook.magics import unload_extension

    unload_extension(ipython)


def panel(*args, **kwargs):
    """The snapshot panel (an ipywidgets widget); see ``nbguard.notebook.panel.Panel``."""
    from .notebook.panel import open_panel

    return open_panel(*args, **kwargs)
