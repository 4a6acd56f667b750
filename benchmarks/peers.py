"""The peers nbguard is compared with, measured on the same state in the same process.

* ``torch.save`` of ``{"model": model.state_dict(), "opt": opt.state_dict()}`` to one file, then
  ``fsync``: blocking, so its stall is its total. Restore: ``torch.load(weights_only=True)`` (plain
  and ``mmap=True``) then ``load_state_dict`` on both objects, from a cold page cache.
* ``torch.distributed.checkpoint`` (DCP): ``get_state_dict(model, opt)`` then ``dcp.save`` (blocking)
  and ``dcp.async_save`` with its default CPU stager (a fresh one per call, as the API does when no
  stager is given) and with one ``DefaultStager`` kept between calls (its staging copies are cached
  and reused). No process group: DCP saves single-process when ``torch.distributed`` is not
  initialised. ``FileSystemWriter`` fsyncs every file (``sync_files=True``). Restore: ``dcp.load``
  into ``get_state_dict``'s tensors, then ``set_state_dict``, cold.
* torchsnapshot (when it installs and imports): ``Snapshot.async_take`` stall and ``wait()``; it
  does not fsync, so "until durable" adds an fsync of every file it wrote (timed). Restore:
  ``Snapshot(path).restore(app_state)``, cold.

Every function takes a fresh folder and returns plain numbers (seconds, bytes).
"""

from __future__ import annotations

import gc
import os
import shutil
import time
import warnings
from typing import Any

import torch

from .floors import IoDelta, PeakRss, advance, evict_tree, fsync_tree, rehome, settle, touch, tree_size


def _clean(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    gc.collect()


# -- torch.save -------------------------------------------------------------------------------------
def torch_save_once(model: torch.nn.Module, opt: torch.optim.Optimizer, folder: str) -> dict[str, Any]:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "ckpt.pt")
    settle()
    with PeakRss() as mem:
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        total = time.perf_counter() - t0
    out = {"stall": total, "durable": total, "written": os.path.getsize(path), "peak_rss_increase": mem.increase}
    for mmap in (False, True):
        evict_tree(folder)
        with IoDelta() as io, PeakRss() as mem:
            t0 = time.perf_counter()
            sd = torch.load(path, weights_only=True, mmap=mmap)
            model.load_state_dict(sd["model"])
            opt.load_state_dict(sd["opt"])
            touch(model, opt)
            elapsed = time.perf_counter() - t0
        del sd
        key = "restore_mmap" if mmap else "restore"
        out[key] = elapsed
        out[key + "_read_bytes"] = io.read_bytes
        out[key + "_peak_rss_increase"] = mem.increase
        gc.collect()
        t0 = time.perf_counter()
        advance(model, opt)  # the first in-place update after the restore
        out[key + "_first_update"] = time.perf_counter() - t0
        rehome(opt)
        gc.collect()
    _clean(folder)
    return out


# -- torch.distributed.checkpoint ---------------------------------------------------------------------
def _dcp():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    return dcp, get_state_dict, set_state_dict


def dcp_save_once(model, opt, folder: str) -> dict[str, Any]:
    dcp, get_state_dict, set_state_dict = _dcp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        settle()
        with PeakRss() as mem:
            t0 = time.perf_counter()
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=folder)
            total = time.perf_counter() - t0
        out = {"stall": total, "durable": total, "written": tree_size(folder), "peak_rss_increase": mem.increase}
        del msd, osd
        evict_tree(folder)
        with IoDelta() as io, PeakRss() as mem:
            t0 = time.perf_counter()
            msd, osd = get_state_dict(model, opt)
            dcp.load({"model": msd, "optim": osd}, checkpoint_id=folder)
            set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
            touch(model, opt)
            out["restore"] = time.perf_counter() - t0
        out["restore_read_bytes"] = io.read_bytes
        out["restore_peak_rss_increase"] = mem.increase
        del msd, osd
    _clean(folder)
    return out


def dcp_async_once(model, opt, folder: str, stager=None) -> dict[str, Any]:
    dcp, get_state_dict, _ = _dcp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if stager is None:  # run_dcp_reused settles before calling
            settle()
        with PeakRss() as mem:
            t0 = time.perf_counter()
            msd, osd = get_state_dict(model, opt)
            kwargs = {"async_stager": stager} if stager is not None else {}
            future = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=folder, **kwargs)
            stall = time.perf_counter() - t0
            if hasattr(future, "upload_completion"):  # AsyncSaveResponse (async staging)
                future = future.upload_completion
            future.result()
            durable = time.perf_counter() - t0
    out = {"stall": stall, "durable": durable, "written": tree_size(folder), "peak_rss_increase": mem.increase}
    del msd, osd, future
    _clean(folder)
    return out


def dcp_reused_stager():
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    return DefaultStager(StagingOptions(False, False, False, False))


# -- torchsnapshot ------------------------------------------------------------------------------------
def torchsnapshot_status() -> tuple[bool, str]:
    """(available, version or the reason it is not)."""
    try:
        import torchsnapshot
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return False, f"not available: {type(exc).__name__}: {exc}"[:300]
    return True, getattr(torchsnapshot, "__version__", "unknown")


def torchsnapshot_once(model, opt, folder: str) -> dict[str, Any]:
    import torchsnapshot

    app_state = {"model": model, "opt": opt}
    path = os.path.join(folder, "snap")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        settle()
        with PeakRss() as mem:
            t0 = time.perf_counter()
            pending = torchsnapshot.Snapshot.async_take(path=path, app_state=app_state)
            stall = time.perf_counter() - t0
            snapshot = pending.wait()
            waited = time.perf_counter() - t0
            fsync_tree(path)  # torchsnapshot writes without fsync: make it durable, timed
            durable = time.perf_counter() - t0
        out = {"stall": stall, "wait": waited, "durable": durable, "written": tree_size(path),
               "peak_rss_increase": mem.increase}
        del pending, snapshot
        gc.collect()
        evict_tree(path)
        with IoDelta() as io, PeakRss() as mem:
            t0 = time.perf_counter()
            torchsnapshot.Snapshot(path=path).restore(app_state=app_state)
            touch(model, opt)
            out["restore"] = time.perf_counter() - t0
        out["restore_read_bytes"] = io.read_bytes
        out["restore_peak_rss_increase"] = mem.increase
    _clean(folder)
    return out
