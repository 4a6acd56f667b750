"""Reading a function's bytecode: the globals it reads, assigns and mutates.

A function defined in another cell (or a module's function the notebook calls) has no source the
cell scan sees, so its code object is read instead: ``code_uses`` follows the value stack to learn
which global each slot came from, so ``losses.append(x)`` or ``history[k] = v`` mark the global as
changed. Nested functions and comprehensions are read too.
"""

from __future__ import annotations

import dis
import functools
import types

from .uses import Uses, mutates

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


def _simulate(code: types.CodeType, self_name: str | None, out: Uses) -> None:
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
                if owner[0] == "global" and mutates(val):
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
            n = ins.arg or 1  # SWAP and ROT_N always have an argument
            if len(stack) >= n:
                stack[-1], stack[-n] = stack[-n], stack[-1]
        elif op in _ROTATIONS or op == "ROT_N":
            n = _ROTATIONS.get(op) or ins.arg or 1
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
def code_uses(code: types.CodeType, self_name: str | None) -> Uses:
    """What ``code`` (and the code nested in it) uses; ``self_name``: its argument that is ``self``."""
    uses = Uses()
    _simulate(code, self_name, uses)
    return uses
