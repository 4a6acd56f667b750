"""The long crash-consistency run: hundreds of SIGKILLs, resumes and torn files (not in the default tests).

    . .venv/bin/activate
    python scripts/stress.py --trials 300 --seed 1              # the plain-script variant
    python scripts/stress.py --trials 300 --seed 1 --kernel     # plus --kernel-trials real kernel trials
    python scripts/stress.py --trials 200 --tear-rate 0 --seed 2  # kills only

Each trial runs the guarded training of ``tests/crash_harness.py`` (a Python script on ``nbguard.Guard``,
keep=2, a save every 2 of 12 steps), kills it with SIGKILL -- right before one file-system event
(create, write, fsync, rename, fsync-dir, delete; the indices of a fault-free run are cycled through,
so a few hundred trials cover every one) or after a random delay -- and, in ``--tear-rate`` of the
trials, damages the newest snapshot afterwards (a blob or the manifest cut in half, or one bit of it
flipped). A second run resumes and trains to the end. Checked after every trial:

    lost        the last snapshot the child reported committed (handle.wait() returned) is not listed,
                or the newest listed one is older
    wrong       the resume was not from the newest intact snapshot, or the final digest (weights,
                optimizer, scheduler, history, every RNG) differs from an uninterrupted run's
    partial     something listed does not verify (Catalog.verify() not empty), or gc left temp files
    torn        damage must be skipped with one message naming the snapshot, the previous snapshot used

``--kernel`` adds trials on a real Jupyter kernel running ``%%checkpointed`` (about 4 s each): killed at a
file-system event (cycled) or at a random moment, then a new kernel re-runs the notebook's cells.

Prints the counts; exits 1 if any snapshot was lost, any resume was wrong, anything partial was listed,
or any damaged file was not handled as specified.
"""

from __future__ import annotations

import argparse
import collections
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import crash_harness as ch  # noqa: E402


def classify_torn(trial: ch.Trial) -> str:
    """How a trial with a damaged snapshot went."""
    if trial.lost or trial.problems:
        return "other problem"
    if trial.wrong:
        if trial.resumed is None and trial.expected_resume is not None:
            return "restore failed instead of falling back"
        return "damage not detected: wrong resume"
    if trial.unreported:
        return "skipped without a message"
    return "handled"


def script_trials(args: argparse.Namespace, workdir: Path, rnd: random.Random) -> tuple[list, dict]:
    launcher = ch.Launcher(workdir / "children")
    try:
        child = launcher.fork("plain_child")
        assert child.wait() == 0, child.output()
        expected = ch.Report.parse(child.output()).digest
        events, guarded = ch.record_events(launcher, workdir / "record")
        assert guarded.digest == expected, "a guarded uninterrupted run must end like a plain one"
        indices = list(range(1, len(events) + 1))
        rnd.shuffle(indices)
        tear_modes = [m for m in args.tear_modes.split(",") if m]
        trials = []
        event_turn = 0
        started = time.monotonic()
        for n in range(args.trials):
            store = workdir / f"t{n}"
            tear = rnd.choice(tear_modes) if tear_modes and rnd.random() < args.tear_rate else None
            if rnd.random() < args.random_rate:
                trial = ch.script_trial(launcher, store, expected, delay=rnd.uniform(0.0, 0.35), step_sleep=0.02,
                                        tear_mode=tear, rnd=rnd)
                trial.kind = "random"
            else:
                k = indices[event_turn % len(indices)]
                event_turn += 1
                trial = ch.script_trial(launcher, store, expected, kill_at=k, tear_mode=tear, rnd=rnd)
                trial.kind = "event"
                trial.event = events[k - 1][0]
                trial.index = k
            trial.tear_mode = tear
            trials.append(trial)
            if trial.ok and not trial.unreported:
                shutil.rmtree(store, ignore_errors=True)
            if args.verbose or not trial.ok:
                print(f"  trial {n}: {'ok' if trial.ok and not trial.unreported else 'NOT OK'} {trial.describe()[:400]}",
                      flush=True)
            elif (n + 1) % 50 == 0:
                print(f"  {n + 1} trials, {time.monotonic() - started:.0f} s", flush=True)
        return trials, {"events": events}
    finally:
        launcher.close()


def kernel_trials(args: argparse.Namespace, workdir: Path, rnd: random.Random) -> tuple[list, int]:
    import json

    from tests.kernel_harness import Kernel

    workdir.mkdir(parents=True, exist_ok=True)
    kernel = Kernel(str(workdir))
    trials = []
    try:
        kernel.run(ch.KERNEL_SETUP)
        kernel.run(ch.KERNEL_LOOP)
        expected = ch.kernel_digest(kernel)
        kernel.run("%load_ext nbguard")
        kernel.run(ch.KERNEL_SETUP)
        kernel.run(ch.kernel_hook_cell(str(workdir / "record"), str(workdir / "record.log"), None))
        out, error = kernel.run(ch.kernel_cell(str(workdir / "record")))
        assert error is None, out
        assert ch.kernel_digest(kernel) == expected, "a guarded uninterrupted cell must end like a plain one"
        events = ch.kernel_events(json.loads(kernel.run("print(json.dumps(_events))")[0]))
        indices = list(range(1, len(events) + 1))
        rnd.shuffle(indices)
        for n in range(args.kernel_trials):
            folder = workdir / f"k{n}"
            folder.mkdir()
            if rnd.random() < args.random_rate:
                trial = ch.kernel_trial(kernel, folder, expected, delay=rnd.uniform(0.0, 0.45))
                trial.kind = "random"
            else:
                k = indices[n % len(indices)]
                trial = ch.kernel_trial(kernel, folder, expected, kill_at=k)
                trial.kind, trial.event, trial.index = "event", events[k - 1][0], k
            trial.tear_mode = None
            trials.append(trial)
            if args.verbose or not trial.ok:
                print(f"  kernel trial {n}: {'ok' if trial.ok else 'NOT OK'} {trial.describe()[:400]}", flush=True)
        return trials, len(events)
    finally:
        kernel.shutdown()


def report(name: str, trials: list, events_total: int) -> bool:
    """Print the counts of one variant; True when everything was as specified."""
    kills = [t for t in trials if t.tear_mode is None]
    torn = [t for t in trials if t.tear_mode is not None]
    at_events = [t for t in trials if t.kind == "event"]
    by_kind = collections.Counter(t.event for t in at_events)
    distinct = len({t.index for t in at_events})
    random_kills = [t for t in trials if t.kind == "random"]
    lost = sum(len(t.lost) for t in trials)
    wrong_kills = sum(bool(t.wrong) for t in kills)
    partial = sum(bool(t.problems) for t in trials)
    print(f"{name}:")
    print(f"  trials:            {len(trials)}")
    print(f"  kill points:       {len(at_events)} at file-system events ({distinct} distinct of the {events_total} "
          f"events of a run; {', '.join(f'{k} {v}' for k, v in sorted(by_kind.items()))}), "
          f"{len(random_kills)} at random moments")
    print(f"  killed:            {sum(t.killed for t in trials)} "
          f"({sum(not t.killed for t in trials)} runs ended before their random kill)")
    print(f"  lost snapshots:    {lost}")
    print(f"  wrong resumes:     {wrong_kills} (of {len(kills)} kill-only trials)")
    print(f"  partial listed:    {partial}")
    ok = lost == 0 and wrong_kills == 0 and partial == 0
    if torn:
        modes = collections.Counter(t.tear_mode for t in torn)
        print(f"  torn files:        {len(torn)} ({', '.join(f'{k} {v}' for k, v in sorted(modes.items()))})")
        outcomes = collections.defaultdict(collections.Counter)
        for t in torn:
            outcomes[t.tear_mode][classify_torn(t)] += 1
        for mode in sorted(outcomes):
            print(f"    {mode:14s} " + ", ".join(f"{v} {k}" for k, v in sorted(outcomes[mode].items())))
        handled = sum(classify_torn(t) == "handled" for t in torn)
        print(f"  torn handled as specified: {handled} of {len(torn)}")
        ok = ok and handled == len(torn)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=300, help="plain-script trials (default 300)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kernel", action="store_true", help="also run trials on a real Jupyter kernel")
    parser.add_argument("--kernel-trials", type=int, default=30, help="kernel trials with --kernel (default 30)")
    parser.add_argument("--random-rate", type=float, default=0.3, help="share of kills at a random moment (0.3)")
    parser.add_argument("--tear-rate", type=float, default=0.25, help="share of trials that damage a file (0.25)")
    parser.add_argument("--tear-modes", default=",".join(ch.TEAR_MODES),
                        help=f"damage to choose from (default {','.join(ch.TEAR_MODES)})")
    parser.add_argument("--workdir", default=None, help="where stores go (default: a temporary folder)")
    parser.add_argument("--verbose", action="store_true", help="one line per trial")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nbguard-stress-"))
    rnd = random.Random(args.seed)
    started = time.monotonic()
    print(f"nbguard stress: seed {args.seed}, {args.trials} script trials"
          + (f" + {args.kernel_trials} kernel trials" if args.kernel else "") + f", work in {workdir}", flush=True)
    trials, info = script_trials(args, workdir / "script", rnd)
    ok = report("plain script (nbguard.Guard)", trials, len(info["events"]))
    if args.kernel:
        ktrials, total = kernel_trials(args, workdir / "kernel", rnd)
        ok = report("notebook kernel (%%checkpointed)", ktrials, total) and ok
    print(f"time: {time.monotonic() - started:.0f} s; result: {'OK' if ok else 'NOT OK'}")
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
