"""Reading a cell's source (never running it): the global names it reads, assigns and mutates.

Scopes are followed as Python binds names: a function, lambda or class body defined in the cell
has its own locals, a comprehension's loop variables stay inside it, ``global`` and the walrus
bind where Python binds them. Attribute uses (``trainer.model``) are listed for the finder.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence

from .uses import Uses, mutates


def cell_uses(tree: ast.AST) -> Uses:
    """The names a cell's AST uses at its top level (and in what it defines that reads globals)."""
    scan = _CellScan()
    scan.visit(tree)
    return scan.uses


_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)


def _scope_names(node: ast.AST) -> tuple[set[str], set[str]]:
    """(local names, names declared global) of a function, lambda or class body."""
    local: set[str] = set()
    declared: set[str] = set()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        a = node.args
        local.update(x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x)
    body = getattr(node, "body", [])  # a lambda's body is one expression
    todo: list[ast.AST] = list(body) if isinstance(body, list) else [body]
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
        self.uses = Uses()
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
        if isinstance(node.func, ast.Attribute) and mutates(node.func.attr):
            self._mutate(node.func.value)
        self.generic_visit(node)
