"""Disk used by a store over 200 saves at every iteration: it must stay flat.

    python -m benchmarks.store_growth [--saves 200] [--keep 2] [--mib 6] [--via guard|magic]

A model of about ``--mib`` MiB with Adam trains one step per iteration and is saved after every
step: through ``Guard.save`` (``--via guard``, the default) or through a real IPython shell running
``%%checkpointed --every-iter 1`` (``--via magic``). Every 20 saves it prints the bytes on disk, the
blob files and the snapshots listed, without ever running ``gc`` (under the magic a save may be in
flight when sampled). It exits 1 if the store ever held more than keep + 2 snapshots' bytes. Results go to
benchmarks/results/store-growth.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"


def disk_usage(root: Path) -> tuple[int, int, int]:
    """(bytes of every file under root, blob files, leftover temporary files)."""
    files = [p for p in root.rglob("*") if p.is_file()]
    blobs = [p for p in files if p.suffix == ".safetensors" and not p.name.startswith(".tmp-")]
    temps = [p for p in files if p.name.startswith(".tmp-")]
    return sum(p.stat().st_size for p in files), len(blobs), len(temps)


def model_of(mib: float) -> nn.Sequential:
    width = int((mib * 1024 * 1024 / 4 / 3) ** 0.5)  # three square layers of float32
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


def via_guard(root: Path, saves: int, keep: int, mib: float, sample) -> None:
    from nbguard import Guard

    model = model_of(mib)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = Guard(str(root), run="growth", keep=keep, report=print)
    first = model[0]
    assert isinstance(first, nn.Linear)
    width = first.in_features
    for i in range(saves):
        model(torch.randn(8, width)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        guard.save({"model": model, "opt": opt}, position={"step": i})
        sample(i + 1, guard.flush)
    guard.close()


def via_magic(root: Path, saves: int, keep: int, mib: float, sample) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbguard")
    shell.user_ns.update(model=model_of(mib), torch=torch, sample=sample, saves=saves)
    shell.run_cell("opt = torch.optim.Adam(model.parameters(), lr=1e-3)\nwidth = model[0].in_features")
    cell = (f"%%checkpointed --dir {root} --name growth --keep {keep} --every-iter 1 --state model,opt\n"
            "for i in range(saves):\n"
            "    model(torch.randn(8, width)).pow(2).mean().backward()\n"
            "    opt.step()\n"
            "    opt.zero_grad()\n"
            "    sample(i, lambda: None)\n")
    result = shell.run_cell(cell)
    result.raise_error()
    shell.run_line_magic("unload_ext", "nbguard")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saves", type=int, default=200)
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--mib", type=float, default=6.0)
    parser.add_argument("--via", choices=("guard", "magic"), default="guard")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="nbguard-growth-") as tmp:
        root = Path(tmp) / "store"
        started = time.perf_counter()

        def sample(i: int, flush) -> None:
            if i % 20 == 0 or i == 1:
                flush()  # the save in flight is committed and retention has run
                used, blobs, temps = disk_usage(root)
                snapshots = len(list((root / "runs" / "growth" / "snapshots").glob("*.json")))
                rows.append({"save": i, "bytes": used, "blobs": blobs, "temp_files": temps, "snapshots": snapshots})
                print(f"after save {i:4d}: {used / 2**20:8.1f} MiB on disk, {blobs:3d} blob files, "
                      f"{snapshots} snapshots listed, {temps} temp files", flush=True)

        (via_guard if args.via == "guard" else via_magic)(root, args.saves, args.keep, args.mib, sample)
        used, blobs, temps = disk_usage(root)
        elapsed = time.perf_counter() - started
    peak = max(r["bytes"] for r in rows)
    one = used / args.keep  # one snapshot: at the end, every save is committed and `keep` are left
    bound = (args.keep + 2) * one  # the kept snapshots, a save in flight and its temporary file
    print(f"{args.saves} saves in {elapsed:.1f} s; peak {peak / 2**20:.1f} MiB; after the last save "
          f"{used / 2**20:.1f} MiB, {blobs} blob files, {temps} temp files")
    result = {"saves": args.saves, "keep": args.keep, "mib": args.mib, "via": args.via, "rows": rows,
              "final_bytes": used, "peak_bytes": peak, "bound_bytes": bound, "flat": peak <= bound,
              "seconds": elapsed, "machine": platform.platform(), "cpus": os.cpu_count()}
    RESULTS.mkdir(exist_ok=True)
    name = f"store-growth-{args.via}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Store size over {args.saves} saves at every iteration (keep={args.keep}, ~{args.mib:g} MiB "
             f"model + Adam, via {args.via})", "", "| after save | MiB on disk | blob files | snapshots | temp files |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['save']} | {r['bytes'] / 2**20:.1f} | {r['blobs']} | {r['snapshots']} | {r['temp_files']} |"
              for r in rows]
    lines += ["", f"Bounded (peak {peak / 2**20:.1f} MiB <= keep + 2 snapshots = {bound / 2**20:.1f} MiB): "
              f"{result['flat']}. Under the magic, sizes are taken while saving goes on, so a save in flight "
              f"(its blob, its temporary file) may be counted. {elapsed:.1f} s in all on "
              f"{result['machine']} ({result['cpus']} CPUs). No `gc` was run."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    return 0 if result["flat"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
