"""The finder: a cell's training state, following the functions it calls.

``discover`` starts from the names a cell uses (``cell_scan``), follows the notebook's functions,
methods, partials and closures it reaches through their bytecode (``bytecode``), and collects
each training object once by identity, under the name the user knows it by. What it finds is a
``Discovery``.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...errors import UsageError
from .bytecode import code_uses
from .cell_scan import cell_uses
from .kinds import classify, ignored, ipython_variable, is_loader, loader_generators, why_not_plain

_MAX_DEPTH = 8          # how deep calls are followed from the cell
_MAX_FUNCTIONS = 256    # how many function bodies one discovery reads at most


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



class _Finder:
    """Collects training objects, once each by identity, while following what the cell calls."""

    def __init__(self, namespace: Mapping[str, Any]) -> None:
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
                if not ignored(name):
                    self._names.setdefault(id(value), name)
        return self._names.get(id(obj))

    def offer(self, label: str, obj: object, depth: int = 0) -> None:
        """Take ``obj`` if it is a training object; look inside loaders; follow user functions."""
        try:
            if classify(obj) is not None:
                self.add(label, obj)
            elif is_loader(obj):
                for sub, gen in loader_generators(label, obj):
                    self.add(sub, gen)
            elif callable(obj) and not isinstance(obj, type):
                self.follow(obj, label, depth)
        except Exception:  # an object that breaks when looked at (a proxy, a broken property) is no state
            return

    def offer_unnamed(self, obj: object, fallback: str, depth: int) -> None:
        """An object reached through a closure, a partial or an attribute: named as the notebook names it."""
        if classify(obj) is not None or is_loader(obj) or callable(obj):
            self.offer(self.global_name(obj) or fallback, obj, depth)

    def offer_member(self, owner: object, owner_label: str, attr: str, depth: int) -> None:
        """``owner.attr`` used by the cell or a followed function."""
        try:
            if isinstance(owner, (type, types.ModuleType, types.FunctionType)) or is_loader(owner):
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
        uses = code_uses(code, self_name)
        scope = fn.__globals__
        for name in uses.reads:
            if not ignored(name) and name in scope:
                self.offer(name, scope[name], depth + 1)
        self.assigned.update(dict.fromkeys(n for n in uses.assigned if not ignored(n)))
        self.mutated.update(dict.fromkeys(n for n in uses.mutated if not ignored(n)))
        for owner_name, attr in uses.attrs:
            if owner_name == "self" and owner is not None:
                self.offer_member(owner, label, attr, depth + 1)
            elif owner_name != "self" and not ignored(owner_name) and owner_name in scope:
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
            elif classify(value) is not None or is_loader(value):
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


def _resolve(namespace: Mapping[str, Any], name: str) -> tuple[bool, object]:
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


def discover(source: str | ast.Module, namespace: Mapping[str, Any], *, include: Sequence[str] | None = None,
             exclude: Sequence[str] = (), entries: Sequence[Any] = ()) -> Discovery:
    """Find the training objects and plain values a cell uses.

    ``source`` is the cell's Python source (IPython syntax already transformed) or its AST;
    ``namespace`` the globals it runs in. Call it before running the cell and again once it ran:
    names the cell has not created yet are listed in ``values``. ``include`` replaces what is
    found with exactly these names (``--state``; dotted names such as 'trainer.model' work);
    ``exclude`` drops names (``--exclude``). Raises UsageError for an ``include`` name that is
    neither defined nor assigned by the cell, or an ``exclude`` name that is neither found nor defined;
    a cell that does not parse raises SyntaxError. ``entries`` are functions the cell calls without
    naming them (``@nbguard.checkpointed`` applied by a call, under another name): followed too.
    """
    tree = ast.parse(source) if isinstance(source, str) else source
    uses = cell_uses(tree)
    first_use: dict[str, tuple[int, int]] = {}
    for table in (uses.reads, uses.assigned, uses.mutated):
        for name, pos in table.items():
            first_use[name] = min(pos, first_use.get(name, pos))
    finder = _Finder(namespace)
    for name in sorted(first_use, key=first_use.__getitem__):
        if not ignored(name) and name in namespace:
            finder.offer(name, namespace[name])
    for owner, attr in uses.attrs:
        if not ignored(owner) and owner in namespace:
            finder.offer_member(namespace[owner], owner, attr, 1)
    for entry in entries:
        finder.follow(entry, getattr(entry, "__name__", "entry"), 0)
    changed = sorted({*uses.assigned, *uses.mutated}, key=first_use.__getitem__)
    candidates = [n for n in dict.fromkeys([*changed, *finder.assigned, *finder.mutated]) if not ignored(n)]
    assigned = {*uses.assigned, *finder.assigned}

    if include is not None:
        wanted = _split(include)
        reserved = [n for n in wanted if ipython_variable(n.split(".")[0])]
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


def training_objects(namespace: Mapping[str, Any]) -> dict[str, object]:
    """Every training object in a whole namespace (for a save when no guarded cell has run).

    Same classification and dedup as ``discover``: one entry per object, loaders reported by
    their generators, modules that are part of another captured module folded into it.
    """
    finder = _Finder(namespace)
    for name, value in list(namespace.items()):
        if not ignored(name) and (classify(value) is not None or is_loader(value)):
            finder.offer(name, value)
    finder.fold_submodules()
    return dict(finder.objects)
