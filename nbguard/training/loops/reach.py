"""Which functions a guarded cell can reach whose loops nbguard may rewrite.

A function is the user's when its globals are the namespace the cell runs in (defined in an earlier
cell of the notebook, or in the script being guarded). Such functions are found from the names the
cell reads, then from the global names their own code reads (nested defs and lambdas included), and
from the methods of the user's classes whose instances or classes those names hold. Functions of
installed packages have their own module globals and are never touched.
"""

from __future__ import annotations

import ast
import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from .rewrite import (
    InstrumentedFunction,
    NotInstrumentable,
    function_fingerprint,
    instrument_function,
    loop_structure,
)

MAX_FUNCTIONS = 64  # more than any training notebook calls; bounds the work on odd namespaces


@dataclass
class Reach:
    """The user's functions the cell can call, instrumented, and what could not be."""

    functions: list[InstrumentedFunction] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # function name -> why its loops stay plain
    foreign: list[str] = field(default_factory=list)  # top-level calls of the cell into other modules' code
    # qualified name -> (fingerprint, loop structure) of each reached function whose source is known,
    # loops or not: what a snapshot records of them, to tell an edited function from the same one
    versions: dict[str, tuple[str, str]] = field(default_factory=dict)


def reach(tree: ast.Module, namespace: Mapping[str, object], first_id: int, entries: Iterable[object] = ()) -> Reach:
    """Instrument the user's functions reachable from the cell ``tree`` (and from ``entries``, callables
    the cell calls through names of its own); loop ids go on from ``first_id``."""
    out = Reach()
    seen: set[int] = set()
    queue: list[object] = [*entries, *_names(tree)]
    while queue and len(seen) < MAX_FUNCTIONS:
        item = queue.pop(0)
        target = namespace.get(item) if isinstance(item, str) else item
        for function in _functions_behind(target, namespace):
            if id(function) in seen:
                continue
            seen.add(id(function))
            queue.extend(n for n in _code_names(function.__code__) if n not in queue)
            try:
                unit = instrument_function(function, first_id)
            except NotInstrumentable as exc:
                if "no loops" not in str(exc):
                    out.refused[function.__qualname__] = str(exc)
                digest = function_fingerprint(function)
                if digest is not None:
                    out.versions.setdefault(function.__qualname__, (digest, ""))
                continue
            out.functions.append(unit)
            out.versions.setdefault(unit.name, (unit.fingerprint, loop_structure(unit.loops)))
            first_id += len(unit.loops)
    out.foreign = _foreign_calls(tree, namespace)
    return out


def _names(tree: ast.AST) -> Iterator[str]:
    """Names the cell reads, in order of first appearance."""
    seen: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in seen:
            seen.add(node.id)
            yield node.id


def _code_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_names(const)


def _functions_behind(value: object, namespace: Mapping[str, object]) -> Iterable[types.FunctionType]:
    """The user's functions a name gives access to: itself, a partial's target, a bound method's
    function, or the methods of a user's class (for a class or one of its instances)."""
    if isinstance(value, types.MethodType):
        value = value.__func__
    while isinstance(value, types.FunctionType) and value.__globals__ is not namespace and hasattr(value, "__wrapped__"):
        value = value.__wrapped__  # a decorator's wrapper (functools.wraps): the user's function inside
    func = getattr(value, "func", None)  # functools.partial
    if func is not None and not isinstance(value, types.FunctionType):
        value = func
    if isinstance(value, types.FunctionType):
        return [value] if value.__globals__ is namespace else []
    cls = value if isinstance(value, type) else type(value)
    if value is None:
        return []
    # A class of the notebook: its methods were compiled with the notebook as globals (a library's
    # class has none such, whatever it is called).
    return [f for f in vars(cls).values() if isinstance(f, types.FunctionType) and f.__globals__ is namespace]


def _foreign_calls(tree: ast.Module, namespace: Mapping[str, object]) -> list[str]:
    """The callees of the cell's top-level call statements that are not the user's code (a library
    trainer's ``fit``), for the notice that says what cannot be protected while it runs."""
    calls = []
    for stmt in tree.body:
        value = getattr(stmt, "value", None)
        if not isinstance(stmt, (ast.Expr, ast.Assign, ast.AnnAssign, ast.AugAssign)) or not isinstance(value, ast.Call):
            continue
        root = value.func
        while isinstance(root, ast.Attribute):
            root = root.value
        if not isinstance(root, ast.Name) or root.id not in namespace:
            continue  # builtins (print, len) and names the cell creates itself
        if _functions_behind(namespace[root.id], namespace):
            continue
        calls.append(ast.unparse(value.func))
    return list(dict.fromkeys(calls))
