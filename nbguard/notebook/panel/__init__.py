"""The snapshot panel behind ``nbguard.panel(...)`` and ``%nbguard panel``.

Everything but ``widget`` is UI-free: ``controller`` (the actions, over a ``Catalog``), ``listing``
(the list on screen), ``live`` (store events into refreshes), ``model``, ``action_text`` and ``chart``
(plain data, HTML and SVG strings). Only ``widget`` imports ipywidgets, and only when a panel is
opened, so ``import nbguard.notebook.panel.controller`` stays light. ``open_panel`` picks the
catalog and the namespace (IPython's) a panel works on.
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
    from .widget import Panel

    return Panel(_catalog_for(location, guard), run=run,
                 namespace=namespace if namespace is not None else _kernel_namespace(), guard=guard,
                 on_restore=on_restore, page_size=page_size, place_text=place_text, best_metric=best_metric)


def _catalog_for(location: Catalog | Store | str | os.PathLike[str] | None, guard: Guard | None) -> Catalog:
    from ...engine.catalog import Catalog
    from ...stores import open_store

    if isinstance(location, Catalog):
        return location
    if location is None:
        return guard.catalog if guard is not None else Catalog()  # this notebook's default folder
    store = open_store(location)
    if guard is not None and store.url == guard.store.url:
        return guard.catalog  # the Guard's own catalog hears its saves
    return Catalog(store)


def _kernel_namespace() -> MutableMapping[str, Any] | None:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return shell.user_ns if shell is not None else None


def __getattr__(name: str) -> Any:
    if name == "Panel":
        from .widget import Panel

        return Panel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

