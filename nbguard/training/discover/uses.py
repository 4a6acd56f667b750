"""What a piece of code touches: the globals it reads, assigns and changes in place.

Both readers fill a ``Uses``: the cell's AST (``cell_scan``) and a function's bytecode
(``bytecode``). A call of a mutating method (``losses.append``, ``w.add_``) counts as a change.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

#: Methods that change the object they are called on (lists, dicts, sets, numpy arrays).
#: Any ``name_`` method (torch's in-place ops: ``add_``, ``zero_``) counts as well.
MUTATING_METHODS = frozenset({
    "append", "extend", "insert", "pop", "popitem", "update", "setdefault", "clear", "remove",
    "add", "discard", "sort", "reverse", "__setitem__", "__delitem__", "__iadd__",
    "difference_update", "intersection_update", "symmetric_difference_update",
    "fill", "put", "resize", "itemset",
})


@dataclass
class Uses:
    """Names a piece of code touches, in first-use order."""

    reads: dict[str, tuple[int, int]] = field(default_factory=dict)
    assigned: dict[str, tuple[int, int]] = field(default_factory=dict)
    mutated: dict[str, tuple[int, int]] = field(default_factory=dict)
    attrs: list[tuple[str, str]] = field(default_factory=list)

    @staticmethod
    def note(table: dict[str, tuple[int, int]], name: str, node: ast.AST) -> None:
        table.setdefault(name, (getattr(node, "lineno", 0), getattr(node, "col_offset", 0)))


def mutates(method: str) -> bool:
    """Whether calling ``method`` changes the object it is called on."""
    return method in MUTATING_METHODS or (method.endswith("_") and not method.startswith("_"))
