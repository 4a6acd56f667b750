"""The ``nbguard`` command: ls, show, verify, export, gc, demo.

DIR is the folder that ``NBGUARD_DIR`` or a magic's ``--dir`` names; it covers every run in it.
A folder holding several such folders (``nbguard-snapshots/`` next to your notebooks) works too.
Errors are one line on stderr and exit status 2; ``verify`` exits 1 when something is damaged.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .engine.catalog import Catalog
from .errors import NbguardError, UsageError
from .humanize import ago, clock, printable
from .humanize import size as human_size
from .stores import LocalStore


def default_dir() -> str:
    return os.environ.get("NBGUARD_DIR") or "nbguard-snapshots"


def stores_in(location: str) -> list[Catalog]:
    """The store at ``location``, or each store directly inside it (a folder of notebooks' stores)."""
    if "://" in location:
        return [Catalog(location)]
    if not os.path.exists(location):
        raise UsageError(f"{location} does not exist: pass the folder your snapshots are in (or set NBGUARD_DIR)")
    if not os.path.isdir(location):
        raise UsageError(f"{location} is a file: pass the folder your snapshots are in")
    if os.path.isdir(os.path.join(location, "runs")):
        return [Catalog(LocalStore(location))]
    inner = sorted(e.path for e in os.scandir(location) if e.is_dir() and os.path.isdir(os.path.join(e.path, "runs")))
    if not inner:
        raise UsageError(f"no nbguard snapshots in {location}: pass the folder shown by %load_ext nbguard or NBGUARD_DIR")
    return [Catalog(LocalStore(path)) for path in inner]


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def cmd_ls(args: argparse.Namespace) -> int:
    for catalog in stores_in(args.dir):
        snapshots = catalog.snapshots(args.run)
        print(f"{catalog.store.url}: {len(snapshots)} snapshot{'s' if len(snapshots) != 1 else ''}, "
              f"{human_size(catalog.usage())} on disk")
        rows = []
        for s in snapshots:
            # Names, tags and positions come from the manifest: printed escaped, never as terminal codes.
            metrics = " ".join(f"{printable(k)}={v:.4g}" for k, v in list(s.metrics.items())[:3])
            badges = ",".join(printable(b) for b in ("pinned" if s.pinned else "", *s.tags) if b)
            rows.append([s.id, s.run, f"{clock(s.created)} ({ago(s.created)})", printable(s.label), metrics,
                         human_size(s.size), badges])
        if rows:
            print(_table(rows, ["ID", "RUN", "SAVED", "POSITION", "METRICS", "SIZE", "FLAGS"]))
        for path, problem in catalog.problems.items():
            print(f"  damaged: {printable(path)}: {printable(problem)}")
    return 0


def _one(args: argparse.Namespace) -> Catalog:
    catalogs = stores_in(args.dir)
    for catalog in catalogs:
        try:
            catalog.find(args.id, getattr(args, "run", None))
            return catalog
        except NbguardError:
            continue
    return catalogs[0]


def cmd_show(args: argparse.Namespace) -> int:
    catalog = _one(args)
    snapshot = catalog.get(args.id, args.run)
    info, m = snapshot.info, snapshot.manifest
    print(f"snapshot {info.id}  (run {info.run}, in {catalog.store.url})")
    print(f"  saved      {clock(info.created)} ({ago(info.created)})")
    if info.label:
        print(f"  position   {printable(info.label)}")
    for name, value in info.metrics.items():
        print(f"  metric     {printable(name)} = {value:.6g}")
    if info.note:
        print(f"  note       {printable(info.note)}")
    if info.tags:
        print(f"  tags       {', '.join(printable(t) for t in info.tags)}")
    if info.lineage:
        print(f"  lineage    {printable(info.lineage)} (writer {printable(info.writer)})")
    print(f"  size       {human_size(info.size)} ({human_size(info.written)} newly written)")
    print(f"  pinned     {'yes' if info.pinned else 'no'}   state: {info.state}")
    for name, obj in m["objects"].items():
        print(f"  holds      {printable(name)}: {printable(obj['type'].rsplit('.', 1)[-1])}")
    for name, reason in m["skipped"].items():
        print(f"  skipped    {printable(name)}: {printable(reason)}")
    print("  versions   " + printable(", ".join(f"{k} {v}" for k, v in m["versions"].items())))
    devices = sorted({t["device"] for t in m["tensors"].values()})
    print(f"  devices    {printable(', '.join(devices)) or 'none'}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    damaged = 0
    for catalog in stores_in(args.dir):
        count = len(catalog.snapshots(args.run))
        broken = catalog.verify(args.run)
        for what, problem in broken.items():
            print(f"DAMAGED {catalog.store.url}: {printable(what)}: {printable(problem)}")
        damaged += len(broken)
        print(f"{catalog.store.url}: {count} snapshot{'s' if count != 1 else ''} checked, "
              f"{len(broken)} damaged")
    return 1 if damaged else 0


def cmd_export(args: argparse.Namespace) -> int:
    path = _one(args).export(args.id, args.module, args.out, args.run)
    print(f"wrote the weights of {args.module} to {path} (load them with safetensors.torch.load_file "
          "or nbguard.load_weights)")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    for catalog in stores_in(args.dir):
        report = catalog.gc(grace=args.grace)
        head, *kept = report.lines()
        print(f"{catalog.store.url}: {head}")
        for line in kept:
            print(line)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.dir_for_demo)


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"--grace needs a number of seconds of at least 0, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbguard", description=_plain(__doc__.split("\n\n")[0]),
                                     epilog=_plain(__doc__.split("\n\n", 1)[1]))
    sub = parser.add_subparsers(dest="command", required=True)

    def with_dir(p: argparse.ArgumentParser, positional: bool = True) -> None:
        if positional:
            p.add_argument("dir", nargs="?", default=default_dir(), help="snapshot folder (default: $NBGUARD_DIR or ./nbguard-snapshots)")
        else:
            p.add_argument("--dir", default=default_dir(), help="snapshot folder (default: $NBGUARD_DIR or ./nbguard-snapshots)")
        p.add_argument("--run", default=None, help="only this run")

    p = sub.add_parser("ls", help="list snapshots")
    with_dir(p)
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("show", help="details of one snapshot")
    p.add_argument("id", help="snapshot id (or a unique prefix), 'latest' or 'best:METRIC'")
    with_dir(p, positional=False)
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("verify", help="re-hash every snapshot; exit 1 if anything is damaged")
    with_dir(p)
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("export", help="write one module's weights to a .safetensors file")
    p.add_argument("id")
    p.add_argument("--module", required=True, help="name of the module in the snapshot, e.g. model")
    p.add_argument("--out", required=True, help="output file, e.g. model.safetensors")
    with_dir(p, positional=False)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("gc", help="remove unused blobs and leftovers of interrupted saves")
    with_dir(p)
    p.add_argument("--grace", type=_seconds, default=3600.0,
                   help="leftovers of writes whose writer may still run (another machine) are removed only when "
                        "older than this many seconds; unused blobs and leftovers of finished processes go at once")
    p.set_defaults(func=cmd_gc)
    p = sub.add_parser("demo", help="train, crash, resume: see nbguard at work in under a minute")
    p.add_argument("dir_for_demo", nargs="?", default=None, metavar="DIR",
                   help="where the demo's snapshots go (default: $NBGUARD_DIR, else nbguard-demo in the temporary folder)")
    p.set_defaults(func=cmd_demo)
    return parser


def _plain(text: str) -> str:
    """Docstring markup out of what the terminal shows: ``NBGUARD_DIR`` → NBGUARD_DIR."""
    return " ".join(text.replace("``", "").split())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NbguardError as exc:
        print(f"nbguard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`nbguard ls | head -1`): that is not an error. Point stdout at
        # /dev/null so that the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
