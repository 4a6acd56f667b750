"""The snapshot panel behind ``nbguard.panel(...)`` and ``%nbguard panel``.

``model`` and ``chart`` are UI-free (plain data, HTML and SVG strings); only ``widget`` imports
ipywidgets, and only when a panel is opened, so ``import nbguard.notebook.panel.model`` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ...engine.catalog import Catalog
    from ...engine.guard import Guard
    from ...format.manifest import SnapshotInfo
    from ...stores import Store
    from .widget import Panel

__all__ = ["Panel", "open_panel"]


def open_panel(
    location: Catalog | Store | str | os.PathLike[str] | None = None,
    *,
    run: str | None = None,
    namespace: MutableMapping[str, Any] | None = None,
    guard: Guard | None = None,
    on_restore: Callable[[SnapshotInfo], Any] | None = None,
    page_size: int = 20,
    place_text: str | None = None,
    best_metric: str | None = None,
) -> Panel:
    """The snapshot panel widget (display it as a cell's value, or drive it from code).

    ``location``: a folder, a URL, a Store or a Catalog (default: ``guard``'s store, else
    this notebook's default folder, as ``nbguard.default_dir()``). ``run``: show one run only. ``namespace``: where Restore looks objects up
    and assigns values (default: the IPython user namespace). ``guard``: shows its background
    writer's state. ``on_restore(info)``: called after each successful restore. ``place_text``: the
    sentence saying where snapshots live and whether that survives a disconnect (default: the
    store's URL). ``best_metric``: what the 'best' badge follows ('val_loss', 'acc:max'; default:
    each run's first metric).
    """
    from .widget import open_panel as _open_panel

    return _open_panel(location, run=run, namespace=namespace, guard=guard, on_restore=on_restore,
                       page_size=page_size, place_text=place_text, best_metric=best_metric)


def __getattr__(name: str) -> Any:
    if name == "Panel":
        from .widget import Panel

        return Panel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

