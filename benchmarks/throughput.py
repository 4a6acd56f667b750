"""Lost training throughput as a user pays it, measured end to end.

A script's training function runs plain and under ``@nbguard.checkpointed(every=CADENCE)``, each in
a fresh process, for the same number of steps, the two interleaved A B, B A, ... so that a drift of
the shared machine's speed hits both sides alike. The guarded time covers everything nbguard adds:
its import, the guard and session, state discovery, loop rewriting and the safe point at every
iteration, staging buffers prefaulted in the background, the first save (fresh buffers), every
timer save, the final save and the wait until it is durable. Lost throughput of a pair is
``guarded seconds / plain seconds - 1``; the figure is the median of the pairs, with their range.

    python -m benchmarks.throughput --cadence 30s --seconds 120 --pairs 3
    python -m benchmarks.throughput --cadence 5m --seconds 330 --pairs 1   # the default cadence

The model is ``benchmarks.training``'s MLP (~10.5 M parameters, ~126 MiB of state with Adam).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, sys.argv[5])
from benchmarks.training import make_model

mode, folder, steps, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model, opt = make_model()
gen = torch.Generator().manual_seed(1)
xs = torch.randn(16, 128, 1024, generator=gen)
ys = torch.randint(0, 10, (16, 128), generator=gen)


def train(steps):
    for step in range(steps):
        i = step % len(xs)
        loss = F.cross_entropy(model(xs[i]), ys[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def warm(n):
    for i in range(n):
        loss = F.cross_entropy(model(xs[i % 16]), ys[i % 16])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


warm(20)
if mode == "calibrate":
    t0 = time.perf_counter()
    warm(steps)
    print(json.dumps({"step_s": (time.perf_counter() - t0) / steps}))
    sys.exit(0)
t0 = time.perf_counter()
if mode == "guarded":
    import nbguard
    fn = nbguard.checkpointed(every=every, dir=folder, name="bench")(train)
else:
    fn = train
final_loss = fn(steps)
seconds = time.perf_counter() - t0
saves = len(nbguard.Catalog(folder).snapshots()) if mode == "guarded" else 0
print(json.dumps({"seconds": seconds, "saves_kept": saves, "final_loss": final_loss,
                  "threads": torch.get_num_threads()}))
"""


def _child(mode: str, folder: str, steps: int, every: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", CHILD, mode, folder, str(steps), every, HERE], env=env,
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(cadence: str, seconds: float, pairs: int, log: Any = print) -> dict[str, Any]:
    """Interleaved plain/guarded runs of ``seconds`` each; see the module docstring."""
    scratch = tempfile.mkdtemp(prefix="nbguard-throughput-")
    try:
        step_s = _child("calibrate", scratch, 60, cadence)["step_s"]
        steps = max(1, round(seconds / step_s))
        log(f"throughput @{cadence}: {steps} steps per run (~{step_s * 1e3:.0f} ms/step), {pairs} pair(s)")
        # Discarded: the first full-length process after a pause ran up to 30 % slower here, whichever
        # side it was (measured: plain 32.0 s then guarded 21.4 s; guarded 26.0 s then plain 25.0 s).
        _child("plain", os.path.join(scratch, "warm-up"), max(1, steps // 3), cadence)
        rounds = []
        for pair in range(pairs):
            times = {}
            for mode in (("plain", "guarded") if pair % 2 == 0 else ("guarded", "plain")):
                folder = os.path.join(scratch, f"run-{pair}-{mode}")
                shutil.rmtree(folder, ignore_errors=True)
                times[mode] = _child(mode, folder, steps, cadence)
                shutil.rmtree(folder, ignore_errors=True)
            if times["guarded"]["final_loss"] != times["plain"]["final_loss"]:
                raise RuntimeError(f"the guarded run did not do the plain run's work: final loss "
                                   f"{times['guarded']['final_loss']!r} vs {times['plain']['final_loss']!r}")
            lost = times["guarded"]["seconds"] / times["plain"]["seconds"] - 1
            rounds.append({"plain_s": times["plain"]["seconds"], "guarded_s": times["guarded"]["seconds"],
                           "lost": lost, "saves_kept": times["guarded"]["saves_kept"]})
            log(f"  pair {pair}: plain {times['plain']['seconds']:.1f} s, guarded {times['guarded']['seconds']:.1f} s"
                f" -> lost {lost:+.2%}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    losses = [r["lost"] for r in rounds]
    return {"cadence": cadence, "seconds": seconds, "steps": steps, "step_s": step_s, "pairs": rounds,
            "lost_median": statistics.median(losses), "lost_min": min(losses), "lost_max": max(losses)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cadence", default="30s", help="the guarded run's --every (default 30s)")
    parser.add_argument("--seconds", type=float, default=120.0, help="length of each run (default 120)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--target", type=float, default=None, help="limit for the median lost throughput, e.g. 0.02")
    parser.add_argument("--out", default=os.path.join(HERE, "benchmarks", "results"))
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    result = measure(args.cadence, args.seconds, args.pairs)
    result.update(load_start=load, load_end=os.getloadavg()[0],
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command="python -m benchmarks.throughput " + " ".join(argv if argv is not None else sys.argv[1:]))
    verdict = ""
    if args.target is not None:
        verdict = " PASS" if result["lost_median"] < args.target else " MISS"
        result["target"] = args.target
    line = (f"lost throughput @{args.cadence} (measured, {args.pairs} pair(s) of {args.seconds:g} s runs): "
            f"median {result['lost_median']:+.2%}, range {result['lost_min']:+.2%} .. {result['lost_max']:+.2%}"
            f"{verdict}")
    print(line)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"throughput-{args.cadence}-{time.strftime('%Y%m%d-%H%M%S')}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# {line}\n\n`{result['command']}` · {result['date']} · load {load:.1f} → {result['load_end']:.1f}\n\n"
                "| pair | plain s | guarded s | lost | snapshots kept |\n|---|---|---|---|---|\n")
        for i, r in enumerate(result["pairs"]):
            f.write(f"| {i} | {r['plain_s']:.1f} | {r['guarded_s']:.1f} | {r['lost']:+.2%} | {r['saves_kept']} |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
