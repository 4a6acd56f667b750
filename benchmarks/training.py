"""Training overhead: a real training loop with and without nbguard saving at a fixed cadence.

The model is an MLP (1024 → 2048 → 2048 → 2048 → 10, ~10.5 M parameters, ~126 MiB of state with
Adam) trained on generated data; a step takes a few tens of milliseconds on the 2-core machines.
Time is split into segments of ``segment_s`` seconds, alternating baseline and guarded segments
(B G, G B, ... so a drift of the shared machine's speed hits both sides alike). A guarded segment
calls ``guard.save`` at its start and then every ``cadence_s`` seconds, with one Guard kept for the
whole run (its staging buffers are reused, as in a real session; keep=2, so from the third save
on each save also deletes the oldest snapshot). Then a dense pair (``dense_s`` seconds each, a
save every ``dense_every_s`` seconds) gives enough saves for a stable per-save figure.

Figures:

* measured lost throughput: 1 − (guarded steps/s) / (baseline steps/s), at the 30 s cadence (and
  at the dense cadence);
* per-save loss, measured locally for every save: the save's stall plus, for every step that began
  while the background writer was busy, its excess over the median baseline step. Divided by a
  cadence it gives the lost throughput at that cadence; for 5 min it is *derived* this way (a 5 min
  cadence would need a run of many minutes to measure directly).
"""

from __future__ import annotations

import gc
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def make_model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(1024, 2048), torch.nn.ReLU(),
        torch.nn.Linear(2048, 2048), torch.nn.ReLU(),
        torch.nn.Linear(2048, 2048), torch.nn.ReLU(),
        torch.nn.Linear(2048, 10),
    )
    return model, torch.optim.Adam(model.parameters(), lr=1e-4)


def run_training(folder: str, *, segment_s: float = 30.0, pairs: int = 2, cadence_s: float = 30.0,
                 dense_s: float = 20.0, dense_every_s: float = 4.0, batch: int = 128,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    import nbguard

    model, opt = make_model()
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(16, batch, 1024, generator=gen)
    ys = torch.randint(0, 10, (16, batch), generator=gen)
    counter = [0]

    def step() -> None:
        i = counter[0] % len(xs)
        counter[0] += 1
        loss = F.cross_entropy(model(xs[i]), ys[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(30):  # warm-up
        step()
    t0 = time.perf_counter()
    for _ in range(30):
        step()
    step_s = (time.perf_counter() - t0) / 30
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    log(f"training: MLP {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, state "
        f"{state_bytes / 2**20:.0f} MiB, batch {batch}, ~{step_s * 1e3:.0f} ms/step")

    shutil.rmtree(folder, ignore_errors=True)
    notes: list[str] = []
    guard = nbguard.Guard(folder, run="train", keep=2, report=notes.append)
    state = {"model": model, "opt": opt}
    guard.save(state, position={"step": counter[0]}, wait=True)  # the session's first save (untimed)

    segments: list[dict[str, Any]] = []
    saves: list[dict[str, Any]] = []
    base_steps: list[float] = []

    def segment(kind: str, seconds: float, every: float, label: str) -> None:
        gc.collect()
        steps = 0
        pending: list[dict[str, Any]] = []
        start = time.perf_counter()
        next_save = start
        while True:
            now = time.perf_counter()
            if now - start >= seconds:
                break
            if kind == "guard" and now >= next_save:
                s0 = time.perf_counter()
                handle = guard.save(state, position={"step": counter[0]})
                pending.append({"stall": time.perf_counter() - s0, "handle": handle, "excess_steps": [],
                                "phase": label})
                next_save += every
            active = []
            for rec in pending:
                if "finished" in rec:
                    continue
                if rec["handle"].done():
                    rec["finished"] = time.perf_counter()
                    rec["stats"] = guard.last_stats
                else:
                    active.append(rec)
            b0 = time.perf_counter()
            step()
            dt = time.perf_counter() - b0
            for rec in active:
                rec["excess_steps"].append(dt)
            if kind == "base":
                base_steps.append(dt)
            steps += 1
        elapsed = time.perf_counter() - start
        for rec in pending:
            if "finished" not in rec:
                rec["handle"].wait()
                rec["finished"] = time.perf_counter()
                rec["stats"] = guard.last_stats
                rec["spilled"] = True  # still writing when the segment ended
            rec["handle"].result()
            saves.append(rec)
        segments.append({"phase": label, "kind": kind, "steps": steps, "seconds": elapsed,
                         "steps_per_s": steps / elapsed, "saves": len(pending)})
        log(f"  {label} {kind:5s}: {steps / elapsed:6.2f} steps/s ({steps} steps, {len(pending)} saves)")

    for pair in range(pairs):
        for kind in (("base", "guard") if pair % 2 == 0 else ("guard", "base")):
            segment(kind, segment_s, cadence_s, f"cadence {cadence_s:g}s #{pair}")
    for kind in ("base", "guard"):
        segment(kind, dense_s, dense_every_s, f"dense (save every {dense_every_s:g}s)")
    guard.close()

    base_median = statistics.median(base_steps)
    per_save = []
    for r in saves:
        excess = sum(max(0.0, d - base_median) for d in r["excess_steps"])
        st = r["stats"]
        per_save.append({
            "phase": r["phase"], "stall": r["stall"], "loss_s": r["stall"] + excess,
            "steps_while_writing": len(r["excess_steps"]),
            "written_bytes": st.written_bytes if st else None, "staged_bytes": st.staged_bytes if st else None,
            "durable_after": st.durable_after if st else None, "spilled": bool(r.get("spilled")),
        })

    def rate(kind: str, dense: bool) -> float:
        segs = [s for s in segments if s["kind"] == kind and s["phase"].startswith("dense") == dense]
        return sum(s["steps"] for s in segs) / sum(s["seconds"] for s in segs)

    pair_losses = []
    for pair in range(pairs):
        b = next(s for s in segments if s["phase"].endswith(f"#{pair}") and s["kind"] == "base")
        g = next(s for s in segments if s["phase"].endswith(f"#{pair}") and s["kind"] == "guard")
        pair_losses.append(1 - g["steps_per_s"] / b["steps_per_s"])
    loss_per_save = statistics.median(p["loss_s"] for p in per_save) if per_save else None
    written = [p["written_bytes"] for p in per_save if p["written_bytes"] is not None]
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "model": "MLP 1024-2048-2048-2048-10 + Adam", "batch": batch, "state_bytes": state_bytes,
        "step_s": step_s, "baseline_step_median_s": base_median, "segment_s": segment_s, "pairs": pairs,
        "cadence_s": cadence_s, "dense_s": dense_s, "dense_every_s": dense_every_s,
        "segments": segments, "saves": per_save,
        "baseline_steps_per_s": rate("base", False), "guarded_steps_per_s": rate("guard", False),
        "lost_throughput_30s_measured": 1 - rate("guard", False) / rate("base", False),
        "lost_throughput_30s_per_pair": pair_losses,
        "lost_throughput_dense_measured": 1 - rate("guard", True) / rate("base", True),
        "loss_per_save_s": loss_per_save, "saves_measured": len(per_save),
        "lost_throughput_dense_derived": loss_per_save / dense_every_s if loss_per_save is not None else None,
        "lost_throughput_30s_derived": loss_per_save / 30.0 if loss_per_save is not None else None,
        "lost_throughput_5min_derived": loss_per_save / 300.0 if loss_per_save is not None else None,
        "written_per_save": statistics.median(written) if written else None,
        "notes": notes,
    }
