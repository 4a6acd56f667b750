"""Opening stores by location: built-in schemes, registered schemes and entry-point plugins."""

from __future__ import annotations

import textwrap

import pytest
import torch

import nbguard
from nbguard import MemoryStore, UsageError, open_store
from nbguard.stores import register_scheme
from nbguard.stores.registry import SHARED


def test_a_registered_scheme_opens_through_its_opener_and_a_guard_saves_there():
    opened = []

    def opener(url: str) -> MemoryStore:
        opened.append(url)
        return SHARED.memory("registered-" + url.split("://", 1)[1])

    register_scheme("nbgtest", opener)
    store = open_store("nbgtest://alpha")
    assert opened == ["nbgtest://alpha"] and isinstance(store, MemoryStore)
    guard = nbguard.Guard("nbgtest://alpha", run="r", report=None)
    guard.save({"w": torch.ones(3)}, wait=True)
    guard.close()
    assert [s.run for s in nbguard.Catalog(store).snapshots()] == ["r"]


@pytest.mark.parametrize("scheme", ["", "Upper", "1abc", "with space", "a/b"])
def test_a_scheme_that_is_not_a_url_scheme_is_refused(scheme):
    with pytest.raises(UsageError, match="not a URL scheme"):
        register_scheme(scheme, lambda url: MemoryStore())


def test_an_entry_point_in_the_nbguard_stores_group_opens_its_scheme(tmp_path, monkeypatch):
    (tmp_path / "nbg_plugin_store.py").write_text(textwrap.dedent("""
        from nbguard import MemoryStore
        STORES = {}
        def open_it(url):
            return STORES.setdefault(url, MemoryStore(url.split("://", 1)[1]))
    """))
    dist = tmp_path / "nbg_plugin_store-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nbg-plugin-store\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[nbguard.stores]\nplugtest = nbg_plugin_store:open_it\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    store = open_store("plugtest://beta")
    assert isinstance(store, MemoryStore) and store.url == "memory://beta"
    assert open_store("plugtest://beta") is store


def test_an_unknown_scheme_says_what_works():
    with pytest.raises(UsageError, match="unknown store URL scheme 'nosuchscheme'"):
        open_store("nosuchscheme://x")
