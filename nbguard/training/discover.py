"""Find the training state a cell uses: state is found, not declared.

``discover(cell, namespace)`` reads a cell's source (never runs it) and the live namespace and
sorts what it finds into training objects (anything with ``state_dict``/``load_state_dict``, plus
``torch.Generator``), plain values the cell assigns or mutates, and names it cannot capture, each
with the reason. Functions the cell calls are followed through their bytecode, so state touched
in a ``train_one_epoch()`` defined in another cell is found too. No IPython import here.
"""

from __future__ import annotations

import ast
import collections
import dis
import functools
import inspect
import io
import re
import sys
import types
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from ..errors import UsageError

#: Methods that change the object they are called on (lists, dicts, sets, numpy arrays).
#: Any ``name_`` method (torch's in-place ops: ``add_``, ``zero_``) counts as well.
MUTATING_METHODS = frozenset({
    "append", "extend", "insert", "pop", "popitem", "update", "setdefault", "clear", "remove",
    "add", "discard", "sort", "reverse", "__setitem__", "__delitem__", "__iadd__",
    "difference_update", "intersection_update", "symmetric_difference_update",
    "fill", "put", "resize", "itemset",
})

_IPYTHON_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython"})
_IPYTHON_PRIVATE = re.compile(r"_+|_i+|_i\d+|_\d+|_oh|_dh|_ih|__nbguard__")
_LOADER_PATHS = ("generator", "sampler.generator", "batch_sampler.sampler.generator", "batch_sampler.generator")
_MAX_DEPTH = 8          # how deep calls are followed from the cell
_MAX_FUNCTIONS = 256    # how many function bodies one discovery reads at most
_MAX_NESTING = 64       # how deep a plain value may nest
_NOT_STATE = "not a training object or plain value"


@dataclass(frozen=True)
class Discovery:
    """What a cell's state is made of.

    ``objects``: training objects by the name the user knows them by ('model', 'loader.generator').
    ``values``: names of plain variables; names that do not exist yet are looked up at save time.
    ``skipped``: names the cell assigns that cannot be captured, with the reason in plain words.
    ``aliases``: other names of a captured object, mapped to where its state is saved ('net' ->
    'model', or 'encoder' -> 'model.encoder' for a module saved as part of another).
    """

    objects: dict[str, object]
    values: list[str]
    skipped: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the user: what is captured, what is skipped and why."""
        others: dict[str, list[str]] = {}
        for alias, target in self.aliases.items():
            owner = next((n for n in self.objects if target == n or target.startswith(n + ".")), None)
            if owner is not None:
                others.setdefault(owner, []).append(alias)
        parts = []
        for name, obj in self.objects.items():
            also = f"; also {', '.join(others[name])}" if name in others else ""
            parts.append(f"{name} ({type(obj).__name__}{also})")
        parts += self.values
        line = "captured: " + (", ".join(parts) if parts else "nothing")
        if self.skipped:
            line += "; skipped: " + ", ".join(f"{n} ({why})" for n, why in self.skipped.items())
        return line


# ---------------------------------------------------------------- classification


@functools.lru_cache(maxsize=1)
def _torch_kinds() -> tuple[tuple[tuple[type, ...], str], ...]:
    import torch

    def present(*candidates: object) -> tuple[type, ...]:
        return tuple(c for c in candidates if isinstance(c, type))

    lrs = torch.optim.lr_scheduler
    return (
        ((torch.nn.Module,), "module"),
        ((torch.optim.Optimizer,), "optimizer"),
        (present(getattr(lrs, "LRScheduler", None), getattr(lrs, "_LRScheduler", None),
                 getattr(lrs, "ReduceLROnPlateau", None)), "scheduler"),
        (present(getattr(getattr(torch, "amp", None), "GradScaler", None),
                 getattr(torch.cuda.amp, "GradScaler", None)), "scaler"),
        ((torch.Generator,), "generator"),
    )


def classify(obj: object) -> str | None:
    """The kind of training object ``obj`` is, or None.

    'module', 'optimizer', 'scheduler', 'scaler', 'generator', or 'stateful' for anything else
    whose class has callable ``state_dict`` and ``load_state_dict`` (an EMA helper, a metric).
    """
    for kinds, label in _torch_kinds():
        if kinds and isinstance(obj, kinds):
            return label
    cls = type(obj)  # looked up on the class: a class itself, or a Mock, does not count
    if callable(getattr(cls, "state_dict", None)) and callable(getattr(cls, "load_state_dict", None)):
        return "stateful"
    return None


def _is_loader(obj: object) -> bool:
    data = sys.modules.get("torch.utils.data")
    return data is not None and isinstance(obj, (data.DataLoader, data.Sampler))


def _loader_generators(label: str, loader: object) -> Iterator[tuple[str, object]]:
    """A DataLoader has no state of its own; the generators that drive its shuffling do."""
    seen: set[int] = set()
    for path in _LOADER_PATHS:
        obj: object = loader
        for part in path.split("."):
            try:
                obj = getattr(obj, part, None)
            except Exception:  # a property that raises: nothing to capture there
                obj = None
        if obj is not None and id(obj) not in seen and classify(obj) == "generator":
            seen.add(id(obj))
            yield f"{label}.{path}", obj


def why_not_plain(value: object) -> str | None:
    """None if ``value`` is a plain value nbguard stores without pickling, else the reason.

    Plain: None, bool, int, float, complex, str, bytes, torch tensors, numpy arrays (not of
    Python objects) and numpy scalars, and lists, tuples and dicts (str/int/float/bool/None/tuple
    keys) nesting these.
    """
    return _plain(value, 0, set())


def _plain(value: object, depth: int, open_ids: set[int]) -> str | None:
    if value is None or type(value) in (bool, int, float, complex, str, bytes):
        return None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return None
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray):
        return "a numpy array of Python objects" if value.dtype.hasobject else None
    if np is not None and isinstance(value, np.generic):
        return None
    kind = type(value).__name__
    if type(value) in (list, tuple, dict, collections.OrderedDict):
        if depth >= _MAX_NESTING:
            return f"a {kind} nested more than {_MAX_NESTING} levels deep"
        open_ids.add(id(value))
        try:
            items: Iterable[object] = value
            if isinstance(value, dict):
                for key in value:
                    if not (key is None or type(key) in (str, int, float, bool, tuple)):
                        return f"a dict with a {type(key).__name__} key"
                items = (*value.keys(), *value.values())
            for item in items:
                if id(item) in open_ids:
                    return f"a {kind} that contains itself"
                inner = _plain(item, depth + 1, open_ids)
                if inner is not None:
                    return f"a {kind} holding {inner}"
        finally:
            open_ids.discard(id(value))
        return None
    if isinstance(value, types.ModuleType):
        return "a module"
    if isinstance(value, type):
        return "a class"
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)):
        return "a function"
    if isinstance(value, io.IOBase):
        return "an open file"
    return f"a {kind}: {_NOT_STATE}"


def _ignored(name: str) -> bool:
    """IPython's own names and private names (leading underscore) are never state."""
    return name.startswith("_") or name in _IPYTHON_NAMES


# ---------------------------------------------------------------- reading the cell (AST)


@dataclass
class _Uses:
    """Names a piece of code touches, in first-use order."""

    reads: dict[str, tuple[int, int]] = field(default_factory=dict)
    assigned: dict[str, tuple[int, int]] = field(default_factory=dict)
    mutated: dict[str, tuple[int, int]] = field(default_factory=dict)
    attrs: list[tuple[str, str]] = field(default_factory=list)

    @staticmethod
    def note(table: dict[str, tuple[int, int]], name: str, node: ast.AST) -> None:
        table.setdefault(name, (getattr(node, "lineno", 0), getattr(node, "col_offset", 0)))


_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)


def _scope_names(node: ast.AST) -> tuple[set[str], set[str]]:
    """(local names, names declared global) of a function, lambda or class body."""
    local: set[str] = set()
    declared: set[str] = set()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        a = node.args
        local.update(x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x)
    body = node.body if isinstance(node.body, list) else [node.body]
    todo: list[ast.AST] = list(body)
    while todo:
        n = todo.pop()
        if isinstance(n, ast.Global):
            declared.update(n.names)
        elif isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            local.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            local.add(n.name)
            todo.extend((*n.decorator_list, *getattr(n, "bases", ())))
            continue
        elif isinstance(n, ast.Lambda):
            continue
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            local.update((a.asname or a.name).split(".")[0] for a in n.names)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            local.add(n.name)
        elif isinstance(n, _COMPREHENSIONS):
            # only walrus targets bind here; the loop variables belong to the comprehension
            local.update(w.target.id for w in ast.walk(n) if isinstance(w, ast.NamedExpr))
            continue
        todo.extend(ast.iter_child_nodes(n))
    return local - declared, declared


class _CellScan(ast.NodeVisitor):
    def __init__(self) -> None:
        self.uses = _Uses()
        self.scopes: list[tuple[str, set[str], set[str]]] = []  # (kind, locals, declared globals)

    def _is_global(self, name: str) -> bool:
        for i, (kind, local, _) in enumerate(reversed(self.scopes)):
            if kind == "class" and i > 0:
                continue  # a class body's names are not visible in its methods
            if name in local:
                return False
        return True

    def _walrus_binds_global(self, name: str) -> bool:
        """``(name := ...)`` binds in the nearest scope that is not a comprehension."""
        scopes = [s for s in self.scopes if s[0] != "comp"]
        return not scopes or name in scopes[-1][2]

    def _scoped(self, node: ast.AST, kind: str, body: Sequence[ast.AST]) -> None:
        self.scopes.append((kind, *_scope_names(node)))
        for child in body:
            self.visit(child)
        self.scopes.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for outer in (*node.decorator_list, *node.args.defaults, *node.args.kw_defaults):
            if outer is not None:
                self.visit(outer)
        self._scoped(node, "function", node.body)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        for outer in (*node.args.defaults, *node.args.kw_defaults):
            if outer is not None:
                self.visit(outer)
        self._scoped(node, "function", [node.body])

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for outer in (*node.decorator_list, *node.bases, *node.keywords):
            self.visit(outer)
        self._scoped(node, "class", node.body)

    def _comprehension(self, node: ast.AST) -> None:
        gens: list[ast.comprehension] = node.generators  # type: ignore[attr-defined]
        self.visit(gens[0].iter)  # evaluated in the enclosing scope
        targets = {n.id for g in gens for n in ast.walk(g.target) if isinstance(n, ast.Name)}
        self.scopes.append(("comp", targets, set()))
        for i, g in enumerate(gens):
            if i:
                self.visit(g.iter)
            for cond in g.ifs:
                self.visit(cond)
        for part in ("elt", "key", "value"):
            if hasattr(node, part):
                self.visit(getattr(node, part))
        self.scopes.pop()

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        if self._walrus_binds_global(node.target.id):
            self.uses.note(self.uses.assigned, node.target.id, node.target)
        self.visit(node.value)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            if self._is_global(node.id):
                self.uses.note(self.uses.reads, node.id, node)
        elif not self.scopes or (self.scopes[-1][0] != "comp" and node.id in self.scopes[-1][2]):
            self.uses.note(self.uses.assigned, node.id, node)

    def _mutate(self, target: ast.AST) -> None:
        while isinstance(target, ast.Subscript):
            target = target.value
        if isinstance(target, ast.Name) and self._is_global(target.id):
            self.uses.note(self.uses.mutated, target.id, target)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if not isinstance(node.ctx, ast.Load):
            self._mutate(node.value)
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and self._is_global(node.value.id):
            self.uses.attrs.append((node.value.id, node.attr))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Attribute) and _mutates(node.func.attr):
            self._mutate(node.func.value)
        self.generic_visit(node)


def _mutates(method: str) -> bool:
    return method in MUTATING_METHODS or (method.endswith("_") and not method.startswith("_"))


# ---------------------------------------------------------------- reading functions (bytecode)

_JUMPS = frozenset({*dis.hasjrel, *dis.hasjabs, *getattr(dis, "hasjump", ())})
_UNCONDITIONAL = frozenset({
    "JUMP_FORWARD", "JUMP_BACKWARD", "JUMP_ABSOLUTE", "JUMP", "JUMP_NO_INTERRUPT", "JUMP_BACKWARD_NO_INTERRUPT",
})
_NO_FALLTHROUGH = _UNCONDITIONAL | {"RETURN_VALUE", "RETURN_CONST", "RAISE_VARARGS", "RERAISE"}
_STACK_NEUTRAL = _UNCONDITIONAL | {
    "NOP", "RESUME", "EXTENDED_ARG", "CACHE", "KW_NAMES", "COPY_FREE_VARS", "MAKE_CELL", "SETUP_FINALLY",
    "SETUP_CLEANUP", "POP_BLOCK", "NOT_TAKEN", "SETUP_ANNOTATIONS",
}
_SUBSCR_STORES = {"STORE_SUBSCR": 2, "DELETE_SUBSCR": 2, "STORE_SLICE": 3}  # container's depth
_SUBSCR_LOADS = {"BINARY_SUBSCR": 2, "BINARY_SLICE": 3}
_ROTATIONS = {"ROT_TWO": 2, "ROT_THREE": 3, "ROT_FOUR": 4}

_Tag = tuple[str, str] | None  # ('global', name), ('self', '') or nothing known


def _effect(ins: dis.Instruction, jump: bool | None = None) -> int | None:
    try:
        if ins.arg is None:
            return dis.stack_effect(ins.opcode, jump=jump)
        return dis.stack_effect(ins.opcode, ins.arg, jump=jump)
    except (ValueError, TypeError):
        return None


def _generic(stack: list[_Tag], effect: int | None, op: str = "") -> list[_Tag]:
    """An instruction not modelled exactly: keep the depth right and forget what it touched."""
    if effect is None:
        return []
    if effect < 0 and op.startswith(("POP_", "STORE_", "DELETE_")):
        return stack[:effect]  # these only consume
    pops = max(1, 1 - effect)
    kept = stack[:-pops] if len(stack) >= pops else []
    return kept + [None] * (pops + effect)


def _merge(a: list[_Tag], b: list[_Tag]) -> list[_Tag]:
    n = min(len(a), len(b))
    return [x if x == y else None for x, y in zip(a[len(a) - n:], b[len(b) - n:], strict=True)]


def _simulate(code: types.CodeType, self_name: str | None, out: _Uses) -> None:
    """Follow the value stack of one code object to see which globals it reads, sets and mutates.

    Only provenance is tracked (which global a stack slot came from); an instruction the model
    does not know just loses that knowledge, so errors make it miss a mutation, never invent one.
    """
    def note(table: dict[str, tuple[int, int]], name: str) -> None:
        table.setdefault(name, (len(table), 0))

    stack: list[_Tag] = []
    pending: dict[int, list[_Tag]] = {}  # stack state at forward jump targets
    dead = False  # the previous instruction does not fall through
    for ins in dis.get_instructions(code):
        if ins.offset in pending:
            arriving = pending.pop(ins.offset)
            stack = arriving if dead else _merge(stack, arriving)
        elif dead:
            stack = []  # an exception handler: what is below its entry is unknown
        op, val = ins.opname, ins.argval
        effect = _effect(ins)
        if ins.opcode in _JUMPS and isinstance(val, int):
            if val > ins.offset:
                jumped = list(stack) if op in _STACK_NEUTRAL else _generic(stack, _effect(ins, jump=True), op)
                pending[val] = _merge(pending[val], jumped) if val in pending else jumped
            if op not in _STACK_NEUTRAL:
                stack = _generic(stack, _effect(ins, jump=False), op)
        elif op in ("LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"):
            note(out.reads, val)
            if op == "LOAD_FROM_DICT_OR_GLOBALS" and stack:
                stack.pop()
            stack += [None] * ((effect or 1) - 1) + [("global", val)]
        elif op.startswith("LOAD_FAST") or op in ("LOAD_DEREF", "LOAD_CLOSURE"):
            names = val if isinstance(val, tuple) else (val,)
            if len(names) != (effect or 0):
                names = (None,) * (effect or 0)
            stack += [("self", "") if self_name and x == self_name else None for x in names]
        elif op in ("LOAD_ATTR", "LOAD_METHOD"):
            owner = stack.pop() if stack else None
            if owner is not None:
                out.attrs.append((owner[1] if owner[0] == "global" else "self", val))
                if owner[0] == "global" and _mutates(val):
                    note(out.mutated, owner[1])
            stack += [None] * ((effect or 0) + 1)
        elif op in _SUBSCR_LOADS or (op == "BINARY_OP" and ins.argrepr == "[]"):
            depth = _SUBSCR_LOADS.get(op, 2)
            owner = stack[-depth] if len(stack) >= depth else None
            del stack[-depth:]
            stack.append(owner if owner is not None and owner[0] == "global" else None)
        elif op in _SUBSCR_STORES:
            depth = _SUBSCR_STORES[op]
            owner = stack[-depth] if len(stack) >= depth else None
            if owner is not None and owner[0] == "global":
                note(out.mutated, owner[1])
            stack = _generic(stack, effect, op)
        elif op in ("STORE_GLOBAL", "DELETE_GLOBAL"):
            note(out.assigned, val)
            stack = _generic(stack, effect, op)
        elif op in ("COPY", "DUP_TOP"):
            n = ins.arg or 1
            stack.append(stack[-n] if len(stack) >= n else None)
        elif op == "DUP_TOP_TWO":
            stack += stack[-2:] if len(stack) >= 2 else [None, None]
        elif op == "SWAP":
            if len(stack) >= ins.arg:
                stack[-1], stack[-ins.arg] = stack[-ins.arg], stack[-1]
        elif op in _ROTATIONS or op == "ROT_N":
            n = _ROTATIONS.get(op) or ins.arg
            if len(stack) >= n:
                top = stack.pop()
                stack.insert(len(stack) - n + 1, top)
        elif op in _STACK_NEUTRAL:
            pass
        elif (op.startswith("LOAD_") or op == "PUSH_NULL") and effect and effect > 0:
            stack += [None] * effect
        else:
            stack = _generic(stack, effect, op)
        dead = op in _NO_FALLTHROUGH
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _simulate(const, self_name if self_name in const.co_freevars else None, out)


@functools.lru_cache(maxsize=512)
def _code_uses(code: types.CodeType, self_name: str | None) -> _Uses:
    uses = _Uses()
    _simulate(code, self_name, uses)
    return uses


# ---------------------------------------------------------------- putting it together


class _Finder:
    """Collects training objects, once each by identity, while following what the cell calls."""

    def __init__(self, namespace: dict) -> None:
        self.ns = namespace
        self.objects: dict[str, object] = {}
        self.aliases: dict[str, str] = {}
        self.first: dict[int, str] = {}         # id(object) -> the label it is captured under
        self.assigned: dict[str, None] = {}     # globals that followed functions set ...
        self.mutated: dict[str, None] = {}      # ... or change in place, in order
        self.visited: set[tuple[int, int]] = set()
        self._names: dict[int, str] | None = None

    def add(self, label: str, obj: object) -> None:
        first = self.first.setdefault(id(obj), label)
        if first == label:
            self.objects[label] = obj
        elif label not in self.objects:
            self.aliases.setdefault(label, first)

    def global_name(self, obj: object) -> str | None:
        if self._names is None:
            self._names = {}
            for name, value in self.ns.items():
                if not _ignored(name):
                    self._names.setdefault(id(value), name)
        return self._names.get(id(obj))

    def offer(self, label: str, obj: object, depth: int = 0) -> None:
        """Take ``obj`` if it is a training object; look inside loaders; follow user functions."""
        try:
            if classify(obj) is not None:
                self.add(label, obj)
            elif _is_loader(obj):
                for sub, gen in _loader_generators(label, obj):
                    self.add(sub, gen)
            elif callable(obj) and not isinstance(obj, type):
                self.follow(obj, label, depth)
        except Exception:  # an object that breaks when looked at (a proxy, a broken property) is no state
            return

    def offer_unnamed(self, obj: object, fallback: str, depth: int) -> None:
        """An object reached through a closure, a partial or an attribute: named as the notebook names it."""
        if classify(obj) is not None or _is_loader(obj) or callable(obj):
            self.offer(self.global_name(obj) or fallback, obj, depth)

    def offer_member(self, owner: object, owner_label: str, attr: str, depth: int) -> None:
        """``owner.attr`` used by the cell or a followed function."""
        try:
            if isinstance(owner, (type, types.ModuleType, types.FunctionType)) or _is_loader(owner):
                return  # functions of imported modules are not followed
            state = getattr(owner, "__dict__", None)
            # A Module keeps its parts in _modules/_parameters/_buffers, so what sits in its __dict__
            # (an optimizer kept on the model) is not in its state_dict; other training objects'
            # attributes are taken to be covered by their own state_dict.
            if classify(owner) in (None, "module") and isinstance(state, dict) and attr in state:
                self.offer_unnamed(state[attr], f"{owner_label}.{attr}", depth)
                return
            method = inspect.getattr_static(type(owner), attr, None)
            if isinstance(method, (staticmethod, classmethod)):
                method, owner = method.__func__, None
            if isinstance(method, types.FunctionType):
                self.follow_code(method, owner, owner_label, depth)
        except Exception:  # see offer()
            return

    def follow(self, fn: object, label: str, depth: int) -> None:
        if isinstance(fn, functools.partial):
            self.offer(label, fn.func, depth + 1)
            for i, arg in enumerate(fn.args):
                self.offer_unnamed(arg, f"{label}.args[{i}]", depth + 1)
            for key, arg in fn.keywords.items():
                self.offer_unnamed(arg, f"{label}.{key}", depth + 1)
        elif isinstance(fn, types.MethodType):
            owner = fn.__self__
            owner_label = self.global_name(owner) or f"{label}.__self__"
            if classify(owner) is not None:
                self.add(owner_label, owner)
            if isinstance(fn.__func__, types.FunctionType):
                self.follow_code(fn.__func__, owner, owner_label, depth)
        elif isinstance(fn, types.FunctionType):
            self.follow_code(fn, None, label, depth)
        else:
            call = inspect.getattr_static(type(fn), "__call__", None)
            if isinstance(call, types.FunctionType):
                self.follow_code(call, fn, label, depth)

    def follow_code(self, fn: types.FunctionType, owner: object, label: str, depth: int) -> None:
        """Read a function's bytecode (and its nested functions'): the globals it uses and changes."""
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None and wrapped is not fn:
            self.offer(label, wrapped, depth + 1)
        key = (id(fn.__code__), id(owner))
        user_code = fn.__globals__ is self.ns or (fn.__module__ is not None and fn.__module__ == self.ns.get("__name__"))
        if depth > _MAX_DEPTH or len(self.visited) >= _MAX_FUNCTIONS or key in self.visited or not user_code:
            return
        self.visited.add(key)
        code = fn.__code__
        self_name = code.co_varnames[0] if owner is not None and code.co_argcount else None
        uses = _code_uses(code, self_name)
        scope = fn.__globals__
        for name in uses.reads:
            if not _ignored(name) and name in scope:
                self.offer(name, scope[name], depth + 1)
        self.assigned.update(dict.fromkeys(n for n in uses.assigned if not _ignored(n)))
        self.mutated.update(dict.fromkeys(n for n in uses.mutated if not _ignored(n)))
        for owner_name, attr in uses.attrs:
            if owner_name == "self" and owner is not None:
                self.offer_member(owner, label, attr, depth + 1)
            elif owner_name != "self" and not _ignored(owner_name) and owner_name in scope:
                self.offer_member(scope[owner_name], owner_name, attr, depth + 1)
        for var, cell in zip(code.co_freevars, fn.__closure__ or (), strict=False):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            self.offer_unnamed(content, f"{label}.{var}", depth + 1)

    def fold_submodules(self) -> None:
        """A module that is part of another captured module is saved with it, not twice."""
        torch = sys.modules.get("torch")
        modules = [(n, m) for n, m in self.objects.items() if torch and isinstance(m, torch.nn.Module)]
        for label, module in modules if len(modules) > 1 else ():
            if label not in self.objects:
                continue
            for path, sub in module.named_modules():
                other = self.first.get(id(sub))
                if path and other in self.objects and other != label:
                    del self.objects[other]
                    where = f"{label}.{path}"
                    self.aliases[other] = where
                    for alias, target in self.aliases.items():
                        if target == other:
                            self.aliases[alias] = where

    def sort_values(self, names: Iterable[str], assigned: set[str], skipped: dict[str, str]) -> list[str]:
        """Plain values stay, training objects join ``objects``, the rest go to ``skipped``."""
        values: list[str] = []
        for name in names:
            found, value = _resolve(self.ns, name)
            if not found:
                values.append(name)  # the cell has not run yet: looked up at save time
            elif classify(value) is not None or _is_loader(value):
                self.offer(name, value)
            elif (reason := why_not_plain(value)) is None:
                values.append(name)
            elif name in assigned or not isinstance(value, (types.ModuleType, type, types.FunctionType)):
                skipped[name] = reason  # (calling a function on a module, `init.normal_(w)`, is no state)
        return values

    def drop(self, names: set[str]) -> None:
        """Forget objects known by any of these names (or under them: 'loader' drops 'loader.generator')."""
        for label in list(self.objects):
            known_as = {label, *(a for a, t in self.aliases.items() if t == label)}
            if known_as & names or any(label.startswith(n + ".") for n in names):
                del self.objects[label]
        self.aliases = {a: t for a, t in self.aliases.items() if a not in names
                        and any(t == o or t.startswith(o + ".") for o in self.objects)}


def _resolve(namespace: dict, name: str) -> tuple[bool, object]:
    root, *attrs = name.split(".")
    if root not in namespace:
        return False, None
    obj = namespace[root]
    for attr in attrs:
        try:
            obj = getattr(obj, attr)
        except Exception:
            return False, None
    return True, obj


def _split(names: Sequence[str] | str) -> list[str]:
    items = [names] if isinstance(names, str) else names
    return [n.strip() for item in items for n in item.split(",") if n.strip()]


def discover(source: str | ast.Module, namespace: dict, *, include: Sequence[str] | None = None,
             exclude: Sequence[str] = ()) -> Discovery:
    """Find the training objects and plain values a cell uses.

    ``source`` is the cell's Python source (IPython syntax already transformed) or its AST;
    ``namespace`` the globals it runs in. Call it before running the cell and again once it ran:
    names the cell has not created yet are listed in ``values``. ``include`` replaces what is
    found with exactly these names (``--state``; dotted names such as 'trainer.model' work);
    ``exclude`` drops names (``--exclude``). Raises UsageError for an ``include`` name that is
    neither defined nor assigned by the cell, or an ``exclude`` name that is neither found nor defined;
    a cell that does not parse raises SyntaxError.
    """
    tree = ast.parse(source) if isinstance(source, str) else source
    scan = _CellScan()
    scan.visit(tree)
    uses = scan.uses
    first_use: dict[str, tuple[int, int]] = {}
    for table in (uses.reads, uses.assigned, uses.mutated):
        for name, pos in table.items():
            first_use[name] = min(pos, first_use.get(name, pos))
    finder = _Finder(namespace)
    for name in sorted(first_use, key=first_use.__getitem__):
        if not _ignored(name) and name in namespace:
            finder.offer(name, namespace[name])
    for owner, attr in uses.attrs:
        if not _ignored(owner) and owner in namespace:
            finder.offer_member(namespace[owner], owner, attr, 1)
    changed = sorted({*uses.assigned, *uses.mutated}, key=first_use.__getitem__)
    candidates = [n for n in dict.fromkeys([*changed, *finder.assigned, *finder.mutated]) if not _ignored(n)]
    assigned = {*uses.assigned, *finder.assigned}

    if include is not None:
        wanted = _split(include)
        reserved = [n for n in wanted if n.split(".")[0] in _IPYTHON_NAMES or _IPYTHON_PRIVATE.fullmatch(n.split(".")[0])]
        if reserved:
            raise UsageError(f"--state names {', '.join(reserved)}, IPython's own variables: they are never "
                             "training state. Remove them from --state.")
        unknown = [n for n in wanted if n not in candidates and not _resolve(namespace, n)[0]]
        if unknown:
            raise UsageError(f"--state names {', '.join(unknown)}, which the cell does not assign and the "
                             "notebook does not define. Check the spelling, or run the cell that creates "
                             f"{'it' if len(unknown) == 1 else 'them'} first.")
        finder = _Finder(namespace)
        candidates, assigned = wanted, set(wanted)
    skipped: dict[str, str] = {}
    values = finder.sort_values(candidates, assigned, skipped)
    finder.fold_submodules()

    dropped = set(_split(exclude))
    known = {*finder.objects, *finder.aliases, *values, *skipped}
    unknown = sorted(n for n in dropped if n not in known and not _resolve(namespace, n)[0]
                     and not any(k.startswith(n + ".") for k in known))
    if unknown:
        raise UsageError(f"--exclude names {', '.join(unknown)}, which this cell does not use and the "
                         "notebook does not define. Check the spelling.")
    finder.drop(dropped)
    return Discovery(
        objects=dict(finder.objects),
        values=[v for v in values if v not in dropped],
        skipped={k: v for k, v in skipped.items() if k not in dropped},
        aliases=dict(finder.aliases),
    )


def training_objects(namespace: dict) -> dict[str, object]:
    """Every training object in a whole namespace (for a save when no guarded cell has run).

    Same classification and dedup as ``discover``: one entry per object, loaders reported by
    their generators, modules that are part of another captured module folded into it.
    """
    finder = _Finder(namespace)
    for name, value in list(namespace.items()):
        if not _ignored(name) and (classify(value) is not None or _is_loader(value)):
            finder.offer(name, value)
    finder.fold_submodules()
    return dict(finder.objects)
