"""Rewrite a cell's own loops, and those of the functions it calls, so that the end of each
iteration can become a safe point.

Every ``for`` and ``while`` statement of the cell's module-level code (not those inside a def, a
lambda, a class body or a comprehension), or of one function's body (``instrument_function``: the
function keeps its identity, only its ``__code__`` is swapped while a guarded run is active), becomes::

    if __nbguard__.enter(ID):                    # birth of the iterable; False = skip the loop
        for TARGET in __nbguard__.loop(ID, ITER):  # the real iterator, position readable
            BODY
        else:
            ORELSE

and ``while COND: BODY`` becomes a ``for`` over a runtime counter, so both kinds end an iteration
at a ``FOR_ITER`` instruction and the runtime can find that moment from the bytecode offset::

    if __nbguard__.enter(ID):
        for [] in __nbguard__.loop(ID, None):
            if not COND:
                break                     # with an else clause: __nbguard__.stop(ID); continue
            BODY

No Python code runs per iteration of a ``for`` loop; a ``while`` loop pays one ``FOR_ITER`` over
``itertools.repeat``.
"""

from __future__ import annotations

import ast
import copy
import dis
import hashlib
import inspect
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import CodeType, FunctionType
from typing import Literal, NamedTuple

RESERVED_NAME = "__nbguard__"

# Callables that transform or inspect the items of the iterable they are given: a DataLoader reached
# through one of them must yield real batches while a resumed loop skips, never placeholders.
_TRANSFORMING = frozenset({
    "map", "filter", "sorted", "reversed", "sum", "min", "max", "any", "all", "dict", "set", "frozenset",
    "starmap", "filterfalse", "takewhile", "dropwhile", "accumulate", "groupby", "pairwise", "batched",
    "compress", "product", "permutations", "combinations", "combinations_with_replacement",
})
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


class LoopInfo(NamedTuple):
    """One loop of a cell or function. ``id`` is its pre-order number (numbered on from the cell's
    loops for the functions'), ``depth`` how many loops of the same code enclose it, ``parent`` the
    id of the innermost of those (None at the top level of its code)."""

    id: int
    kind: Literal["for", "while"]
    lineno: int
    depth: int
    parent: int | None


@dataclass(frozen=True)
class LoopMeta:
    """What the runtime needs beyond ``LoopInfo``."""

    header: tuple[int, int]  # first and last line of the loop header (where its iterable is built)
    has_else: bool
    placeholders_ok: bool  # a DataLoader reached only through pass-through wrappers may skip without loading
    else_loops: tuple[int, int] | None  # id range [first, last] of the loops inside the else clause
    body: tuple[int, int] = (0, 0)  # first and last line of the loop's body: a call from there runs inside it


@dataclass(frozen=True)
class InstrumentedCell:
    """A parsed and rewritten cell: ``exec(cell.code, namespace)`` with ``namespace[RESERVED_NAME]``
    bound to a ``LoopRuntime`` built for it."""

    source: str
    filename: str
    tree: ast.Module
    code: CodeType
    loops: list[LoopInfo]
    fingerprint: str
    meta: list[LoopMeta] = field(repr=False)
    iteration_ends: dict[int, int] = field(repr=False)  # bytecode offset of a loop's FOR_ITER -> loop id
    name: str = "the cell"


@dataclass(frozen=True)
class InstrumentedFunction:
    """A function of the notebook (or script) with its loops rewritten. ``install()`` swaps the new
    code into the function object, so every caller, however it holds the function, runs it;
    ``uninstall()`` puts the original back."""

    function: FunctionType
    name: str
    original: CodeType
    code: CodeType
    loops: list[LoopInfo]
    fingerprint: str
    meta: list[LoopMeta] = field(repr=False)
    iteration_ends: dict[int, int] = field(repr=False)
    targets: frozenset[str] = frozenset()  # names bound by its for-loops (batches: never state)

    def install(self) -> None:
        self.function.__code__ = self.code

    def uninstall(self) -> None:
        if self.function.__code__ is self.code:
            self.function.__code__ = self.original


Unit = InstrumentedCell | InstrumentedFunction


class NotInstrumentable(Exception):
    """A function whose loops cannot be rewritten (no source, a generator, a closure that does not
    compile back to the same cells); the reason is the message."""


def fingerprint(source: str) -> str:
    """A stable hash of what the cell does: comments, blank lines and formatting do not count."""
    return _digest(ast.parse(source))


def instrument_cell(source: str, filename: str = "<cell>", flags: int = 0) -> InstrumentedCell:
    """Parse ``source`` and rewrite its loops; raises ``SyntaxError`` like ``compile``.

    ``flags`` are passed to ``compile`` (e.g. ``ast.PyCF_ALLOW_TOP_LEVEL_AWAIT``); the cell never
    inherits the ``__future__`` imports of this module.
    """
    tree = ast.parse(source, filename)
    digest = _digest(tree)
    rewriter = _Rewriter()
    tree.body = rewriter.block(tree.body, 0, None)
    ast.fix_missing_locations(tree)
    code = compile(tree, filename, "exec", flags=flags, dont_inherit=True)
    return InstrumentedCell(source, filename, tree, code, rewriter.loops, digest, rewriter.meta,
                            _iteration_ends(code, rewriter.locations))


def instrument_function(function: FunctionType, first_id: int) -> InstrumentedFunction:
    """Rewrite the loops of ``function``'s body, numbering them from ``first_id``. Raises
    ``NotInstrumentable`` (with the reason) when that cannot be done faithfully."""
    original = function.__code__
    if original.co_flags & (inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR):
        raise NotInstrumentable("it is a generator or coroutine")
    tree, node = _parsed_def(function)
    ast.increment_lineno(tree, original.co_firstlineno - node.lineno)
    digest = _digest(node)
    targets = frozenset(n.id for loop in ast.walk(node) if isinstance(loop, ast.For)
                        for n in ast.walk(loop.target) if isinstance(n, ast.Name))
    node.decorator_list = []  # only the code object is taken; the function object stays the user's
    rewriter = _Rewriter(first_id)
    node.body = rewriter.block(node.body, 0, None)
    if not rewriter.loops:
        raise NotInstrumentable("it has no loops")
    module = ast.Module(body=[_enclosed(node, original.co_freevars)], type_ignores=[])
    ast.fix_missing_locations(module)
    compiled = compile(module, original.co_filename, "exec", dont_inherit=True)
    code = _find_code(compiled, original.co_name, bool(original.co_freevars))
    if code is None or code.co_freevars != original.co_freevars:
        raise NotInstrumentable("its closure does not compile back to the same variables")
    return InstrumentedFunction(function, function.__qualname__, original, code, rewriter.loops, digest,
                                rewriter.meta, _iteration_ends(code, rewriter.locations), targets)


def loop_structure(loops: Sequence[LoopInfo]) -> str:
    """A digest of how loops nest (kind and parent of each, in order, numbered from the first):
    bounds, iterables, bodies and every other line do not count. The loops of one cell or function."""
    first = loops[0].id if loops else 0
    shape = ";".join(f"{loop.kind}<{'' if loop.parent is None else loop.parent - first}" for loop in loops)
    return hashlib.sha256(shape.encode()).hexdigest()[:16]


def function_fingerprint(function: FunctionType) -> str | None:
    """A stable hash of what ``function`` does, as ``fingerprint`` for a cell (the same digest its
    ``InstrumentedFunction`` carries); None when its source cannot be read as a plain def."""
    try:
        return _digest(_parsed_def(function)[1])
    except NotInstrumentable:
        return None


def _parsed_def(function: FunctionType) -> tuple[ast.Module, ast.FunctionDef]:
    """``function``'s source parsed alone, and its def; raises ``NotInstrumentable`` (why not)."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError) as exc:
        raise NotInstrumentable(f"its source is not available ({exc})") from None
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise NotInstrumentable(f"its source does not parse alone ({exc.msg})") from None
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.FunctionDef) or node.name != function.__code__.co_name:
        raise NotInstrumentable("its source is not a plain def (a lambda or a generated function)")
    return tree, node


def _digest(node: ast.AST) -> str:
    return hashlib.sha256(ast.dump(node).encode()).hexdigest()[:32]


def _enclosed(node: ast.FunctionDef, freevars: tuple[str, ...]) -> ast.stmt:
    """The def alone, or inside an outer def that binds its free variables (so they compile as cells)."""
    if not freevars:
        return node
    binds: list[ast.stmt] = [ast.Assign(targets=[ast.Name(v, ast.Store())], value=ast.Constant(None)) for v in freevars]
    outer = ast.FunctionDef(name="__nbguard_outer__", args=ast.arguments([], [], None, [], [], None, []),
                            body=[*binds, node, ast.Return(ast.Constant(None))], decorator_list=[], returns=None,
                            type_comment=None)
    if "type_params" in ast.FunctionDef._fields:  # 3.12+
        outer.type_params = []  # type: ignore[attr-defined]
    for stmt in (outer, *binds):
        _locate(stmt, node)
        for child in ast.walk(stmt):
            if not hasattr(child, "lineno") and isinstance(child, (ast.expr, ast.stmt)):
                _locate(child, node)
    return outer


def _find_code(module: CodeType, name: str, nested: bool) -> CodeType | None:
    consts = module.co_consts
    if nested:
        outer = next((c for c in consts if isinstance(c, CodeType) and c.co_name == "__nbguard_outer__"), None)
        consts = outer.co_consts if outer is not None else ()
    return next((c for c in consts if isinstance(c, CodeType) and c.co_name == name), None)


class _Rewriter:
    def __init__(self, first_id: int = 0) -> None:
        self.first_id = first_id
        self.loops: list[LoopInfo] = []
        self.meta: list[LoopMeta] = []
        self.locations: dict[tuple[int, int], int] = {}  # (line, column) of a generated For or its iterable

    def block(self, body: list[ast.stmt], depth: int, parent: int | None) -> list[ast.stmt]:
        return [self.statement(node, depth, parent) for node in body]

    def statement(self, node: ast.stmt, depth: int, parent: int | None) -> ast.stmt:
        if isinstance(node, (ast.For, ast.While)):
            return self.loop(node, depth, parent)
        if isinstance(node, (*_SCOPES, ast.AsyncFor)):
            return node  # other scopes; async for is not instrumented (nor the loops inside it)
        for name in ("body", "orelse", "finalbody"):
            if isinstance(getattr(node, name, None), list):
                setattr(node, name, self.block(getattr(node, name), depth, parent))
        for handler in getattr(node, "handlers", ()):
            handler.body = self.block(handler.body, depth, parent)
        for case in getattr(node, "cases", ()):
            case.body = self.block(case.body, depth, parent)
        return node

    def loop(self, node: ast.For | ast.While, depth: int, parent: int | None) -> ast.stmt:
        loop_id = self.first_id + len(self.loops)
        kind: Literal["for", "while"] = "for" if isinstance(node, ast.For) else "while"
        self.loops.append(LoopInfo(loop_id, kind, node.lineno, depth, parent))
        self.meta.append(None)  # type: ignore[arg-type]  # filled below, after the body got its ids
        body_lines = (node.body[0].lineno, node.body[-1].end_lineno or node.body[-1].lineno)
        body = self.block(node.body, depth + 1, loop_id)
        first_else = self.first_id + len(self.loops)
        orelse = self.block(node.orelse, depth, parent)
        last = self.first_id + len(self.loops) - 1
        else_loops = (first_else, last) if last >= first_else else None

        if isinstance(node, ast.For):
            header_end = node.iter.end_lineno or node.lineno
            call = _runtime_call("loop", [ast.Constant(loop_id), node.iter], node.iter)
            new: ast.For = ast.For(target=node.target, iter=call, body=body, orelse=orelse,
                                   type_comment=node.type_comment)
            placeholders_ok = _passes_items_through(node.iter)
        else:
            header_end = node.test.end_lineno or node.lineno
            call = _runtime_call("loop", [ast.Constant(loop_id), ast.Constant(None)], node.test)
            if orelse:  # the else clause must run when COND is false: end the counter, not break
                leave: list[ast.stmt] = [ast.Expr(_runtime_call("stop", [ast.Constant(loop_id)], node.test)),
                                         ast.Continue()]
            else:
                leave = [ast.Break()]
            check = ast.If(test=ast.UnaryOp(ast.Not(), node.test), body=leave, orelse=[])
            _locate(check, node.test)
            new = ast.For(target=ast.List(elts=[], ctx=ast.Store()), iter=call, body=[check, *body],
                          orelse=orelse, type_comment=None)
            placeholders_ok = False
        _locate(new, node)
        self.locations[(new.lineno, new.col_offset)] = loop_id
        self.locations[(call.lineno, call.col_offset)] = loop_id
        self.meta[loop_id - self.first_id] = LoopMeta((node.lineno, header_end), bool(node.orelse), placeholders_ok,
                                                      else_loops, body_lines)

        guard = ast.If(test=_runtime_call("enter", [ast.Constant(loop_id)], node), body=[new], orelse=[])
        if else_loops is not None:
            # A loop skipped on resume still runs its else clause when the resume point lies inside it.
            again = ast.If(test=_runtime_call("skipped_else", [ast.Constant(loop_id)], node),
                           body=copy.deepcopy(orelse), orelse=[])
            _locate(again, node)
            guard.orelse = [again]
        _locate(guard, node)
        return guard


def _runtime_call(method: str, args: list[ast.expr], where: ast.AST) -> ast.Call:
    func = ast.Attribute(value=ast.Name(RESERVED_NAME, ast.Load()), attr=method, ctx=ast.Load())
    call = ast.Call(func=func, args=args, keywords=[])
    for node in (call, func, func.value, *(a for a in args if isinstance(a, ast.Constant))):
        _locate(node, where)
    return call


def _locate(node: ast.AST, where: ast.AST) -> None:
    ast.copy_location(node, where)
    node.end_lineno = getattr(where, "end_lineno", None) or node.lineno  # type: ignore[attr-defined]
    node.end_col_offset = getattr(where, "end_col_offset", None) or 0  # type: ignore[attr-defined]


def _passes_items_through(expr: ast.expr) -> bool:
    for node in ast.walk(expr):
        if isinstance(node, (ast.GeneratorExp, ast.ListComp, ast.SetComp, ast.DictComp)):
            return False
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name in _TRANSFORMING:
                return False
    return True


def _iteration_ends(code: CodeType, locations: dict[tuple[int, int], int]) -> dict[int, int]:
    """Offsets where a loop's iteration ends: its FOR_ITER (3.11/3.12 give it the location of the
    ``for`` statement, 3.13 that of the iterable) and the EXTENDED_ARGs a backward jump lands on."""
    ends: dict[int, int] = {}
    prefix: list[int] = []
    by_line = {line: loop_id for (line, _), loop_id in locations.items()}  # 3.10 has no columns
    line: int | None = None
    for ins in dis.get_instructions(code):
        line = ins.starts_line or line
        if ins.opname == "EXTENDED_ARG":
            prefix.append(ins.offset)
            continue
        if ins.opname == "FOR_ITER":
            where = getattr(ins, "positions", None)
            loop_id = locations.get((where.lineno, where.col_offset)) if where else by_line.get(line) if line else None
            if loop_id is not None:  # inlined comprehensions (3.12+) have FOR_ITERs of their own
                for offset in (*prefix, ins.offset):
                    ends[offset] = loop_id
        prefix = []
    return ends
