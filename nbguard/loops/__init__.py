"""Safe points at the end of every iteration of a cell's loops, at near zero cost, and exact resume.

    cell = instrument_cell(source)                 # rewrite the cell's for/while loops (ast)
    runtime = LoopRuntime(cell, on_safe_point=save, capture_birth=..., apply_birth=...,
                          resume=ResumePlan(positions) or None, on_resume=restore, every_iter=None)
    with runtime.active():
        runtime.execute(namespace)                 # namespace[RESERVED_NAME] = runtime; exec
    runtime.request_safe_point("timer")            # from any thread or a signal handler

This package imports neither IPython nor torch; it knows nothing of snapshots or stores.
"""

from .arming import ARM_SIGNAL
from .dataloaders import SKIPPED
from .rewrite import RESERVED_NAME, InstrumentedCell, LoopInfo, fingerprint, instrument_cell
from .runtime import LoopPosition, LoopRuntime, ResumePlan, SafePoint

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
