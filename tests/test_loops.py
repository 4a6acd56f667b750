"""The loop rewriter and its runtime, without torch: rewriting keeps the cell's meaning, positions
are right, requests are served at the next iteration end from any thread or signal handler, and
resume plans replay where they should."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from nbguard.errors import RestoreError, UsageError
from nbguard.training.loops import (
    ARM_SIGNAL,
    RESERVED_NAME,
    LoopInfo,
    LoopPosition,
    LoopRuntime,
    ResumePlan,
    SafePoint,
    fingerprint,
    instrument_cell,
)


def run(source: str, *, every_iter: int | None = None, resume: ResumePlan | None = None,
        on_resume: Any = None, births: Any = None, **names: Any) -> tuple[dict, list[SafePoint], LoopRuntime]:
    """Execute ``source`` instrumented; ``poke()`` in the cell requests a safe point."""
    cell = instrument_cell(source)
    points: list[SafePoint] = []
    counter = iter(range(10**9))
    runtime = LoopRuntime(cell, on_safe_point=points.append, every_iter=every_iter, resume=resume,
                          on_resume=on_resume, capture_birth=births or (lambda: next(counter)),
                          apply_birth=lambda birth: None)
    ns: dict = {"poke": lambda reason="poke": runtime.request_safe_point(reason), **names}
    with runtime.active():
        runtime.execute(ns)
    return ns, points, runtime


def plain(source: str, **names: Any) -> dict:
    ns = dict(names)
    exec(compile(source, "<plain>", "exec"), ns)
    return ns


def where(points: list[SafePoint]) -> list[list[tuple[int, int]]]:
    return [[(p.loop_id, p.completed) for p in point.positions] for point in points]


# -- rewriting ----------------------------------------------------------------------------------

LOOPS = '''
def helper():
    for a in range(2):
        pass
class K:
    for b in range(2):
        pass
squares = [c * c for c in range(3)]
f = lambda: [d for d in range(2)]
for epoch in range(2):
    with open(__file__) as fh:
        while False:
            pass
    try:
        for i in range(1):
            pass
    finally:
        for j in range(1):
            pass
else:
    for k in range(1):
        pass
'''


def test_only_the_cells_own_loops_are_listed_in_preorder() -> None:
    cell = instrument_cell(LOOPS)
    assert cell.loops == [
        LoopInfo(0, "for", 10, 0, None),
        LoopInfo(1, "while", 12, 1, 0),
        LoopInfo(2, "for", 15, 1, 0),
        LoopInfo(3, "for", 18, 1, 0),
        LoopInfo(4, "for", 21, 0, None),
    ]
    # Every loop has an iteration end, the one in `finally` twice (the compiler duplicates it).
    assert set(cell.iteration_ends.values()) == {0, 1, 2, 3, 4}


def test_fingerprint_ignores_comments_and_formatting_but_not_code() -> None:
    a = "for i in range(3):\n    x = i  # note\n"
    b = "# header\nfor i in range( 3 ):\n\n    x=i\n"
    assert instrument_cell(a).fingerprint == instrument_cell(b).fingerprint == fingerprint(a)
    assert fingerprint("for i in range(4):\n    x = i\n") != fingerprint(a)


def test_syntax_errors_surface_as_usual() -> None:
    with pytest.raises(SyntaxError):
        instrument_cell("for i in range(3)\n    pass\n")


SEMANTICS = '''
out = []
for i in range(6):
    if i == 1:
        continue
    if i == 4:
        break
    out.append(i)
else:
    out.append("for-else not run")
for i in "ab":
    out.append(i)
else:
    out.append("for-else")
n = 0
while n < 5:
    n += 1
    if n == 2:
        continue
    out.append(n)
else:
    out.append("while-else")
while True:
    n -= 1
    if n == 0:
        break
else:
    out.append("never")
m = 3
while m:
    m -= 1
    if m == 1:
        break
else:
    out.append("while-else not run")
for a, (b, c) in zip("xy", [(1, 2), (3, 4)]):
    out.append((a, b, c))
for k, v in {"p": 1, "q": 2}.items():
    for w in range(v):
        try:
            if w:
                continue
            out.append((k, w))
        finally:
            out.append("fin")
match out[0]:
    case 0:
        for z in (1, 2):
            out.append(z)
gen = (g for g in range(3))
for g in gen:
    out.append(g * 10)
'''


def test_rewritten_loops_behave_like_the_original() -> None:
    ns, points, runtime = run(SEMANTICS)
    assert ns["out"] == plain(SEMANTICS)["out"]
    assert points == [] and runtime.safe_points == 0


def test_errors_in_the_cell_keep_their_line_numbers() -> None:
    source = "x = 0\nfor i in range(3):\n    x += 1\n    if i == 2:\n        1 / 0\n"
    with pytest.raises(ZeroDivisionError) as info:
        run(source)
    assert info.traceback[-1].lineno == 4  # 0-based line of `1 / 0`


def test_known_iterators_run_unwrapped_and_unknown_ones_get_a_counting_wrapper() -> None:
    data = [1, 2, 3]
    assert type(_iterator(range(10))) is type(iter(range(10)))
    assert type(_iterator(data)) is type(iter(data))
    assert type(_iterator(enumerate(data))) is enumerate
    assert type(_iterator({"a": 1}.items())) is type(iter({}.items()))
    assert type(_iterator(x for x in data)) is map
    assert type(_iterator(zip(data, data, strict=True))) is map


def _iterator(iterable: Any) -> Any:
    """What the ``for`` statement of a rewritten loop runs on."""
    runtime = LoopRuntime(instrument_cell("for i in x:\n    pass\n"), on_safe_point=print)
    assert runtime.enter(0)
    return runtime.loop(0, iterable)


# -- safe points ----------------------------------------------------------------------------------

NESTED = '''
log = []
for epoch in range(3):
    for i, x in enumerate(data):
        if (epoch, i) in stops:
            poke()
        log.append((epoch, i))
    if epoch == 1:
        poke()
    k = 0
    while k < 2:
        k += 1
'''


def test_nested_loops_report_their_positions() -> None:
    _, points, _ = run(NESTED, data="abcd", stops={(0, 0), (1, 2), (2, 3)})
    assert where(points) == [
        [(0, 0), (1, 1)],  # end of epoch 0, batch 0: epoch 0 is in progress
        [(0, 1), (1, 3)],
        [(0, 1), (2, 1)],  # requested after the batch loop: served by the while loop's first iteration
        [(0, 2), (1, 4)],  # the last batch of the last epoch
    ]
    assert points[0].reasons == {"poke"}
    assert [p.birth for p in points[0].positions] == [0, 1]


def test_positions_count_from_enumerate_start_and_through_generators() -> None:
    source = '''
for i, c in enumerate(data, start=5):
    if i == 6:
        poke()
for g in (x for x in data):
    if g == "c":
        poke()
for j in range(10, 0, -2):
    if j == 6:
        poke()
'''
    _, points, _ = run(source, data="abcd")
    assert where(points) == [[(0, 2)], [(1, 3)], [(2, 3)]]


def test_a_request_from_another_thread_is_served_within_the_next_iteration() -> None:
    source = '''
for i in range(200):
    sleep(0.002)
'''
    cell = instrument_cell(source)
    points: list[SafePoint] = []
    runtime = LoopRuntime(cell, on_safe_point=points.append)
    ns: dict = {"sleep": time.sleep}
    asked_at: list[int] = []

    def ask() -> None:
        while ns.get("i", 0) < 50:
            time.sleep(0.001)
        asked_at.append(ns["i"])
        runtime.request_safe_point("timer")

    thread = threading.Thread(target=ask)
    with runtime.active():
        thread.start()
        runtime.execute(ns)
    thread.join()
    assert len(points) == 1 and points[0].reasons == {"timer"}
    assert points[0].positions[0].completed in (asked_at[0] + 1, asked_at[0] + 2)


def test_requests_while_the_cell_is_not_running_are_ignored() -> None:
    cell = instrument_cell("for i in range(3):\n    pass\n")
    points: list[SafePoint] = []
    runtime = LoopRuntime(cell, on_safe_point=points.append)
    runtime.request_safe_point("early")
    with runtime.active():
        runtime.execute({})
    runtime.request_safe_point("late")
    assert points == [] and runtime.pending == set()
    with runtime.active():
        runtime.execute({})
    assert points == []


def test_a_request_from_a_signal_handler_in_the_main_thread_arms_directly() -> None:
    source = '''
for i in range(5):
    if i == 2:
        interrupt()
    done.append(i)
'''
    cell = instrument_cell(source)
    points: list[SafePoint] = []
    runtime = LoopRuntime(cell, on_safe_point=points.append)
    previous = signal.signal(signal.SIGINT, lambda signum, frame: runtime.request_safe_point("interrupt"))
    try:
        ns: dict = {"interrupt": lambda: signal.raise_signal(signal.SIGINT), "done": []}
        with runtime.active():
            runtime.execute(ns)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert where(points) == [[(0, 3)]] and points[0].reasons == {"interrupt"}


def test_the_callback_can_stop_the_cell_at_the_loop_header_and_leaves_no_tracer_behind() -> None:
    source = "total = 0\nfor i in range(10):\n    total += i\n    if i == 3:\n        poke()\n"
    cell = instrument_cell(source)

    def stop(point: SafePoint) -> None:
        raise KeyboardInterrupt

    runtime = LoopRuntime(cell, on_safe_point=stop)
    ns: dict = {"poke": lambda: runtime.request_safe_point("interrupt")}
    before = sys.gettrace()
    with pytest.raises(KeyboardInterrupt) as info, runtime.active():
        runtime.execute(ns)
    assert ns["total"] == 6  # iteration 3 completed, 4 never started
    lines = {f.lineno for f in traceback.extract_tb(info.value.__traceback__) if f.filename == "<cell>"}
    # Raised at the loop header (3.13 reports the jump back, on the last line of the body).
    assert lines == ({5} if sys.version_info >= (3, 13) else {2})
    assert sys.gettrace() is before


def test_active_restores_the_signal_handler_and_tracer_even_when_the_cell_raises() -> None:
    source = "for i in range(10):\n    poke()\n    if i == 2:\n        raise ValueError('boom')\n"
    seen = []

    def tracer(frame: Any, event: str, arg: Any) -> None:
        return None

    previous_handler = signal.getsignal(ARM_SIGNAL) if ARM_SIGNAL else None
    previous_trace = sys.gettrace()
    sys.settrace(tracer)
    try:
        with pytest.raises(ValueError):
            run(source, seen=seen)
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous_trace)
    if ARM_SIGNAL:
        assert signal.getsignal(ARM_SIGNAL) == previous_handler


@pytest.mark.skipif(ARM_SIGNAL is None, reason="no spare signal on this platform")
def test_a_real_signal_of_the_arming_number_reaches_the_previous_handler() -> None:
    got: list[int] = []
    previous = signal.signal(ARM_SIGNAL, lambda signum, frame: got.append(signum))
    try:
        run("for i in range(3):\n    if i == 1:\n        send()\n", send=lambda: signal.raise_signal(ARM_SIGNAL))
    finally:
        signal.signal(ARM_SIGNAL, previous)
    assert got == [ARM_SIGNAL]


def test_requests_made_during_the_callback_are_served_at_the_next_iteration_end() -> None:
    cell = instrument_cell("for i in range(4):\n    if i == 0:\n        poke()\n")
    points: list[SafePoint] = []

    def again(point: SafePoint) -> None:
        points.append(point)
        if len(points) == 1:
            runtime.request_safe_point("again")

    runtime = LoopRuntime(cell, on_safe_point=again)
    with runtime.active():
        runtime.execute({"poke": lambda: runtime.request_safe_point("poke")})
    assert where(points) == [[(0, 1)], [(0, 2)]]
    assert [p.reasons for p in points] == [{"poke"}, {"again"}]


def test_every_iter_counts_the_outermost_loop_and_takes_pending_requests_along() -> None:
    source = '''
for epoch in range(5):
    for i in range(3):
        if (epoch, i) == (1, 2):
            poke()
    if epoch == 3:
        poke("late")
'''
    _, points, _ = run(source, every_iter=2)
    assert where(points) == [[(0, 1), (1, 3)], [(0, 2)], [(0, 4)]]
    assert [p.reasons for p in points] == [{"poke"}, {"every-iter"}, {"every-iter", "late"}]


def test_every_iter_must_be_positive() -> None:
    with pytest.raises(UsageError):
        LoopRuntime(instrument_cell("pass\n"), on_safe_point=print, every_iter=0)


# -- resume -----------------------------------------------------------------------------------

RESUMABLE = '''
log.append("start")
for epoch in range(3):
    log.append(("epoch", epoch))
    for i in feed(epoch):
        log.append((epoch, i))
    step = 0
    while step < 3:
        step += 1
        log.append(("step", epoch, step))
log.append("end")
'''


def feed(epoch: int):
    yield from range(4)


def test_resume_skips_completed_iterations_and_restores_at_the_innermost_loop() -> None:
    births = iter(range(100))
    ns, points, _ = run(RESUMABLE, log=[], feed=feed, births=lambda: next(births))
    full = ns["log"]
    restored: list[list] = []
    plan = ResumePlan([LoopPosition(0, 1, 0), LoopPosition(1, 2, 0)])
    log: list = []
    ns2, _, runtime = run(RESUMABLE, log=log, feed=feed, resume=plan,
                          on_resume=lambda: (restored.append(list(log)), log.clear(), log.extend(full[:12])))
    assert restored == [["start", ("epoch", 1)]]  # code before the loops and the partial body ran
    assert ns2["log"] == full and runtime.resumed


def test_resume_into_a_while_loop_restores_before_its_condition() -> None:
    source = '''
for epoch in range(3):
    state["step"] = 99
    while state["step"] < 3:
        state["step"] += 1
        log.append(("step", epoch, state["step"]))
        if epoch == 2:
            poke()
'''
    log: list = []
    state: dict = {}
    ns, points, _ = run(source, log=log, state=state, resume=ResumePlan([LoopPosition(0, 2), LoopPosition(1, 1)]),
                        on_resume=lambda: state.update(step=1))
    # Without the restore coming first, step would be 99 and the loop would not run at all.
    assert log == [("step", 2, 2), ("step", 2, 3)]
    assert where(points) == [[(0, 2), (1, 2)], [(0, 2), (1, 3)]]  # the count goes on from 1


def test_earlier_loops_of_the_resumed_iteration_are_skipped() -> None:
    source = '''
for epoch in range(2):
    for i in range(3):
        log.append(("train", epoch, i))
    for j in range(2):
        log.append(("val", epoch, j))
'''
    log: list = []
    run(source, log=log, resume=ResumePlan([LoopPosition(0, 0), LoopPosition(2, 1)]))
    assert log == [("val", 0, 1), ("train", 1, 0), ("train", 1, 1), ("train", 1, 2), ("val", 1, 0), ("val", 1, 1)]


def test_resume_point_inside_the_else_clause_of_a_skipped_loop() -> None:
    source = '''
for a in range(2):
    log.append(("a", a))
else:
    for b in range(3):
        log.append(("b", b))
'''
    log: list = []
    run(source, log=log, resume=ResumePlan([LoopPosition(1, 1)]))
    assert log == [("b", 1), ("b", 2)]


def test_completed_plan_skips_every_loop_and_its_else_clause() -> None:
    source = '''
log.append("before")
for a in range(2):
    log.append(a)
else:
    log.append("else")
log.append("between")
while True:
    log.append("never")
log.append("after")
'''
    log: list = []
    calls: list = []
    run(source, log=log, resume=ResumePlan(completed=True), on_resume=lambda: calls.append(list(log)))
    assert log == ["before", "between", "after"] and calls == [["before"]]


def test_a_plan_that_does_not_fit_the_cell_is_refused() -> None:
    source = "for a in range(3):\n    if a < 10:\n        continue\n    for b in range(3):\n        pass\nfor c in range(2):\n    pass\n"
    with pytest.raises(RestoreError, match="reached the for loop of line 6 instead"):
        run(source, resume=ResumePlan([LoopPosition(0, 1), LoopPosition(1, 0)]))
    with pytest.raises(RestoreError, match="now has only 3"):
        run(source, resume=ResumePlan([LoopPosition(0, 7)]))
    with pytest.raises(RestoreError, match="without reaching"):
        run(source.replace("range(3)", "range(0)", 1).split("for c")[0], resume=ResumePlan([LoopPosition(0, 0), LoopPosition(1, 1)]))
    with pytest.raises(RestoreError, match="do not fit"):
        run(source, resume=ResumePlan([LoopPosition(5, 0)]))
    with pytest.raises(RestoreError, match="do not fit"):
        run(source, resume=ResumePlan([LoopPosition(0, 0), LoopPosition(2, 0)]))
    with pytest.raises(UsageError):
        ResumePlan()


def test_positions_from_json_are_accepted() -> None:
    plan = ResumePlan([[0, "2", {"rng": 1}, [True, False]]])  # type: ignore[list-item]
    assert plan.positions == (LoopPosition(0, 2, {"rng": 1}, (True, False)),)


def test_a_resumed_generator_is_consumed_not_just_counted() -> None:
    pulled: list[int] = []

    def numbers():
        for n in range(5):
            pulled.append(n)
            yield n

    log: list = []
    run("for n in numbers():\n    log.append(n)\n", log=log, numbers=numbers, resume=ResumePlan([LoopPosition(0, 3)]))
    assert pulled == [0, 1, 2, 3, 4] and log == [3, 4]


def test_the_reserved_name_is_bound_by_execute() -> None:
    ns: dict = {}
    cell = instrument_cell("for i in range(2):\n    pass\n")
    runtime = LoopRuntime(cell, on_safe_point=print)
    with runtime.active():
        runtime.execute(ns)
    assert ns[RESERVED_NAME] is runtime and RESERVED_NAME == "__nbguard__"
    with pytest.raises(UsageError), runtime.active(), runtime.active():
        pass


def test_the_loops_package_imports_neither_ipython_nor_torch() -> None:
    # nbguard/__init__ pulls torch in for other modules: load the loops package on its own.
    script = ("import os, sys, types\n"
              "package = types.ModuleType('nbguard')\n"
              "package.__path__ = [os.path.abspath('nbguard')]\n"
              "sys.modules['nbguard'] = package\n"
              "import nbguard.training.loops\n"
              "print(sorted(m for m in ('IPython', 'torch', 'numpy') if m in sys.modules))\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_arming_from_a_python_callback_inside_a_c_call_reaches_the_cells_frame() -> None:
    source = '''
def key(value):
    if value == 3 and i == 1:
        poke()  # runs in a Python frame that C code (sorted) called
    return -value
for i in range(4):
    sorted(range(5), key=key)
    done.append(i)
'''
    ns, points, _ = run(source, done=[])
    assert where(points) == [[(0, 2)]] and ns["done"] == [0, 1, 2, 3]


def test_a_request_made_before_the_cell_starts_is_served_at_its_first_iteration_end() -> None:
    cell = instrument_cell("x = 1\nfor i in range(3):\n    pass\n")
    points: list[SafePoint] = []
    runtime = LoopRuntime(cell, on_safe_point=points.append)
    with runtime.active():
        runtime.request_safe_point("early")
        runtime.execute({})
    assert where(points) == [[(0, 1)]]


@pytest.mark.parametrize("source", [
    "for i in range(N):\n    pass\n",
    "for i, c in enumerate(data[:N]):\n    pass\n",
    "i = 0\nwhile i < N:\n    i += 1\n",
    "for g in (x for x in range(N)):\n    pass\n",
])
def test_no_python_code_runs_per_iteration(source: str) -> None:
    """The zero-cost claim, counted rather than timed: the Python calls nbguard adds to a loop do
    not grow with its number of iterations (timings: benchmarks/safe_point_overhead.py)."""

    def added_calls(n: int) -> int:
        code = source.replace("N", str(n))
        cell = instrument_cell(code)
        runtime = LoopRuntime(cell, on_safe_point=print)
        counts = []
        for compiled, ns in ((cell.code, {RESERVED_NAME: runtime}), (compile(code, "<plain>", "exec"), {})):
            calls = 0

            def profile(frame: Any, event: str, arg: Any) -> None:
                nonlocal calls
                calls += event in ("call", "c_call")

            ns["data"] = "x" * n
            with runtime.active():
                sys.setprofile(profile)
                try:
                    exec(compiled, ns)
                finally:
                    sys.setprofile(None)
            counts.append(calls)
        return counts[0] - counts[1]

    assert added_calls(10) == added_calls(1000) <= 16
