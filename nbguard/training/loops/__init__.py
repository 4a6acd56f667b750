"""Safe points at the end of every iteration of a cell's loops, at near zero cost, and exact resume.

    cell = instrument_cell(source, filename="<cell>")   # rewrite the cell's for/while loops (ast)
    runtime = LoopRuntime(cell, on_safe_point=save, capture_birth=..., apply_birth=...,
                          resume=ResumePlan(positions) or None, on_resume=restore, every_iter=None)
    with runtime.active():                  # spare-signal handler (3.10/3.11) or sys.monitoring
        runtime.execute(namespace)          # tool (3.12+), DataLoader hook; all undone after
    runtime.request_safe_point("timer")     # from any thread or a signal handler

``rewrite`` turns each loop into calls of ``RESERVED_NAME`` (``enter``/``loop``) around the real
iterator; ``arming`` switches on, only while a request is pending, the event that finds the next
iteration end; ``runtime`` keeps the positions (one ``activation`` per running loop) and replays a
``ResumePlan``; ``dataloaders`` skips batches on resume without loading them. No IPython, no torch
import, nothing about snapshots.
"""

from .arming import ARM_SIGNAL
from .dataloaders import SKIPPED
from .positions import LoopPosition, ResumePlan, SafePoint
from .rewrite import RESERVED_NAME, InstrumentedCell, LoopInfo, fingerprint, instrument_cell
from .runtime import LoopRuntime

__all__ = [
    "ARM_SIGNAL",
    "RESERVED_NAME",
    "SKIPPED",
    "InstrumentedCell",
    "LoopInfo",
    "LoopPosition",
    "LoopRuntime",
    "ResumePlan",
    "SafePoint",
    "fingerprint",
    "instrument_cell",
]
