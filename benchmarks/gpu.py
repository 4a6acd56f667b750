"""GPU benchmark: what a save costs the training loop when the state lives on a CUDA device.

    python -m benchmarks.gpu                    # 3 GiB of CUDA state (1 GiB fp32 weights + Adam)
    python -m benchmarks.gpu --size-gib 0.75 --repeats 3 --out benchmarks/results

The stall of a save on a GPU is the device-to-host copy of the changed state. Its floor is one
``copy_`` into host buffers that are page-locked (pinned) and allocated beforehand: the PCIe (or
NVLink-C2C) copy engine's speed. nbguard stages into pinned buffers that it keeps between saves, so
its steady stall should sit on that floor; the first save of a session also allocates (and pins)
them. Shown beside: the same copy into pageable memory, ``torch.save`` (+fsync) and DCP
``async_save`` (its stall is its own device-to-host staging), and a cold restore back onto the GPU.
Prints a table and writes ``gpu-<size>gib.md/.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future
from typing import Any, cast

import torch

from benchmarks import floors as fl
from benchmarks.run import build_state

GiB = 2**30


def _sync() -> None:
    torch.cuda.synchronize()


def state_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for t in fl.state_tensors(model, opt) if t.numel()]


def floors(tensors: list[torch.Tensor], pinned: list[torch.Tensor], pageable: list[torch.Tensor]) -> dict[str, float]:
    out = {}
    for name, targets in (("d2h_pinned", pinned), ("d2h_pageable", pageable)):
        _sync()
        t0 = time.perf_counter()
        for dst, src in zip(targets, tensors, strict=True):
            dst.copy_(src, non_blocking=True)
        _sync()
        out[name] = time.perf_counter() - t0
    _sync()
    t0 = time.perf_counter()
    for dst, src in zip(tensors, pinned, strict=True):
        dst.copy_(src, non_blocking=True)
    _sync()
    out["h2d_pinned"] = time.perf_counter() - t0
    return out


def nbguard_once(model, opt, folder: str) -> dict[str, float]:
    import nbguard

    shutil.rmtree(folder, ignore_errors=True)
    guard = nbguard.Guard(folder, run="gpu", keep=2, report=lambda m: print("nbguard:", m))
    state = {"model": model, "opt": opt}
    out = {}
    _sync()
    t0 = time.perf_counter()
    handle = guard.save(state)
    out["first_stall"] = time.perf_counter() - t0
    handle.result()
    out["first_durable"] = time.perf_counter() - t0
    fl.advance(model, opt)
    _sync()
    t0 = time.perf_counter()
    handle = guard.save(state)
    out["steady_stall"] = time.perf_counter() - t0
    handle.result()
    out["steady_durable"] = time.perf_counter() - t0
    stats = guard.last_stats
    assert stats is not None, "the save above finished"
    out["steady_staged"] = stats.staged_bytes
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    fl.evict_tree(folder)
    _sync()
    t0 = time.perf_counter()
    guard.restore(state)
    _sync()
    out["restore_cold"] = time.perf_counter() - t0
    out["restore_exact"] = float(all(torch.equal(expected[k], v) for k, v in model.state_dict().items()))
    guard.close()
    return out


def torch_save_once(model, opt, folder: str) -> dict[str, float]:
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    path = os.path.join(folder, "ckpt.pt")
    _sync()
    t0 = time.perf_counter()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return {"stall": time.perf_counter() - t0}


def dcp_async_once(model, opt, folder: str) -> dict[str, float] | None:
    try:
        import torch.distributed.checkpoint as dcp
    except ImportError:
        return None
    shutil.rmtree(folder, ignore_errors=True)
    _sync()
    t0 = time.perf_counter()
    future = dcp.async_save({"model": model.state_dict(), "opt": opt.state_dict()}, checkpoint_id=folder)
    stall = time.perf_counter() - t0
    # with the default stager async_save returns a Future (an AsyncSaveResponse only with a custom one)
    cast("Future[Any]", future).result()
    fl.fsync_tree(folder)
    return {"stall": stall, "durable": time.perf_counter() - t0}


def _median(rows: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in rows if r and r.get(key) is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--scratch", default=None, help="folder for the files (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    fl.SETTLE_MODE = "none"
    device = torch.device("cuda")
    model, opt = build_state(args.size_gib)
    model.to(device)
    # Adam's state follows its parameters: move it with them (one step on the device creates it).
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    first = model[0]
    assert isinstance(first, torch.nn.Linear)
    model(torch.randn(2, first.in_features, device=device)).square().mean().backward()
    opt.step()
    for p in model.parameters():
        p.grad = None
    tensors = state_tensors(model, opt)
    size = sum(t.numel() * t.element_size() for t in tensors)
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    pageable = [torch.empty(t.shape, dtype=t.dtype).fill_(0) for t in tensors]
    for buffer in pinned:
        buffer.fill_(0)
    scratch = args.scratch or tempfile.mkdtemp(prefix="nbguard-gpu-")
    rows: dict[str, list[dict[str, float]]] = {"floors": [], "nbguard": [], "torch_save": [], "dcp_async": []}
    started = time.time()
    for round_ in range(args.repeats):
        rows["floors"].append(floors(tensors, pinned, pageable))
        rows["nbguard"].append(nbguard_once(model, opt, os.path.join(scratch, "nbguard")))
        rows["torch_save"].append(torch_save_once(model, opt, os.path.join(scratch, "torch_save")))
        try:
            rows["dcp_async"].append(dcp_async_once(model, opt, os.path.join(scratch, "dcp")) or {})
        except Exception as exc:  # noqa: BLE001 - a peer failing is a figure, not a crash
            rows["dcp_async"].append({})
            print(f"DCP async_save failed: {exc!r}")
        print(f"round {round_ + 1}/{args.repeats}: {json.dumps({k: v[-1] for k, v in rows.items()})}", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)

    med = {case: {k: _median(r, k) for k in (r[0] if r else {})} for case, r in rows.items()}
    pin = med["floors"]["d2h_pinned"]
    assert pin is not None, "every round measured the floors"
    card = torch.cuda.get_device_name()
    lines = [
        f"# nbguard GPU benchmark — {size / GiB:.2f} GiB of CUDA state",
        "",
        f"`python -m benchmarks.gpu --size-gib {args.size_gib:g} --repeats {args.repeats}`",
        "",
        f"- device: {card}; torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}",
        f"- host: {platform.platform()}; {os.cpu_count()} cores; date {time.strftime('%Y-%m-%dT%H:%M:%S%z')};"
        f" {args.repeats} rounds (medians), run took {time.time() - started:.0f} s",
        "",
        "| figure | time | rate | ratio to pinned D2H floor |",
        "|---|---|---|---|",
    ]

    def row(label: str, seconds: float | None) -> None:
        if seconds is None:
            lines.append(f"| {label} | n/a | | |")
            return
        lines.append(f"| {label} | {seconds * 1000:.0f} ms | {size / GiB / seconds:.2f} GiB/s | {seconds / pin:.2f} |")

    row("floor: D2H copy into preallocated pinned buffers", pin)
    row("D2H copy into preallocated pageable buffers", med["floors"]["d2h_pageable"])
    row("H2D copy from pinned buffers", med["floors"]["h2d_pinned"])
    row("nbguard stall, first save (allocates + pins its buffers)", med["nbguard"]["first_stall"])
    row("nbguard stall, steady save (pinned buffers reused)", med["nbguard"]["steady_stall"])
    row("nbguard until durable, steady save", med["nbguard"]["steady_durable"])
    row("nbguard restore cold, onto the GPU", med["nbguard"]["restore_cold"])
    row("torch.save + fsync (stall = until durable)", med["torch_save"]["stall"])
    row("DCP async_save: stall", med["dcp_async"].get("stall"))
    row("DCP async_save: until durable", med["dcp_async"].get("durable"))
    lines += ["", f"Restored state bit-exact: {'yes' if med['nbguard']['restore_exact'] == 1.0 else 'NO'}."]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"gpu-{args.size_gib:g}gib")
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump({"device": card, "size_bytes": size, "rows": rows, "medians": med}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
