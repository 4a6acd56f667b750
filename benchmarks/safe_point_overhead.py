"""Cost of the loop rewriting: `for i in range(100_000): pass` plain vs instrumented.

    python -m benchmarks.safe_point_overhead [--repeat 201]

Prints the median time of each variant and its ratio to the plain run:
  * instrumented, no request pending (the common case: must cost at most a few percent);
  * instrumented with one request per 10,000 iterations (10 safe points per run, served by
    arming the cell's frame; the callback does nothing);
  * the same loop over a generator (those get a counting wrapper) and a `while` loop;
  * a control: the plain code under an active runtime, i.e. what the machine's noise and the
    installed signal handler cost without any rewriting.
Variants are interleaved so that drifts of the machine hit them alike.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable

from nbguard.training.loops import RESERVED_NAME, LoopRuntime, instrument_cell

PLAIN = "for i in range(100_000):\n    pass\n"
# The request is made from the loop body (the main thread) at fixed iterations, so the figure is
# repeatable; a timer thread would make the same call at wall-clock times.
REQUESTS = "for i in range(100_000):\n    if i % 10_000 == 0:\n        request('bench')\n"
GENERATOR = "for i in numbers(100_000):\n    pass\n"
WHILE = "i = 0\nwhile i < 100_000:\n    i += 1\n"


def numbers(n: int):
    yield from range(n)


def plain_runner(source: str) -> Callable[[], None]:
    code = compile(source, "<plain>", "exec")
    namespace = {"request": lambda reason: None, "numbers": numbers}
    return lambda: exec(code, namespace)


def instrumented_runner(source: str) -> tuple[Callable[[], None], list[int]]:
    cell = instrument_cell(source)
    fired: list[int] = []
    runtime = LoopRuntime(cell, on_safe_point=lambda point: fired.append(len(point.positions)))
    namespace = {"request": runtime.request_safe_point, "numbers": numbers, RESERVED_NAME: runtime}

    def run() -> None:
        with runtime.active():
            exec(cell.code, namespace)

    return run, fired


def plain_inside_active(source: str) -> Callable[[], None]:
    """Control: the plain code run under an active runtime (signal handler installed)."""
    run = plain_runner(source)
    runtime = LoopRuntime(instrument_cell(source), on_safe_point=lambda point: None)

    def control() -> None:
        with runtime.active():
            run()

    return control


def timings(runners: dict[str, Callable[[], None]], repeat: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():
        run()  # warm up
    gc.disable()
    try:
        items = list(runners.items())
        for index in range(repeat):
            for name, run in items if index % 2 else reversed(items):  # alternate the order
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=201)
    args = parser.parse_args(argv)
    requests_run, fired = instrumented_runner(REQUESTS)
    pairs = {
        "range, no request pending": (plain_runner(PLAIN), instrumented_runner(PLAIN)[0]),
        "range, 1 request / 10,000 iterations": (plain_runner(REQUESTS), requests_run),
        "generator (counting wrapper)": (plain_runner(GENERATOR), instrumented_runner(GENERATOR)[0]),
        "while loop": (plain_runner(WHILE), instrumented_runner(WHILE)[0]),
        "control: plain code inside active()": (plain_runner(PLAIN), plain_inside_active(PLAIN)),
    }
    runners = {}
    for name, (plain, instrumented) in pairs.items():
        runners[f"{name}|plain"] = plain
        runners[f"{name}|instrumented"] = instrumented
    times = timings(runners, args.repeat)
    runs = 1 + args.repeat  # warm-up included
    print(f"Python {sys.version.split()[0]}, {args.repeat} runs of 100,000 iterations each (ms)")
    print(f"{'variant':40} {'plain':>7} {'nbguard':>8} {'ratio':>6}   {'min ratio':>9}")
    for name in pairs:
        plain_s, instrumented_s = times[f"{name}|plain"], times[f"{name}|instrumented"]
        p, i = statistics.median(plain_s) * 1e3, statistics.median(instrumented_s) * 1e3
        print(f"{name:40} {p:7.3f} {i:8.3f} {i / p:6.3f}   {min(instrumented_s) / min(plain_s):9.3f}")
    print(f"safe points served with requests: {len(fired) / runs:.1f} per run")
    fixed = timings({"plain": plain_runner("for i in range(1):\n    pass\n"),
                     "instrumented": instrumented_runner("for i in range(1):\n    pass\n")[0]}, 2001)
    cost = (statistics.median(fixed["instrumented"]) - statistics.median(fixed["plain"])) * 1e6
    print(f"fixed cost per cell run (active(), enter, loop; 1-iteration loop): {cost:.1f} us")

if __name__ == "__main__":
    main()
