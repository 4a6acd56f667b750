"""Lists torch operators whose schema takes a state-like tensor without declaring a write to it.

Autograd bumps a tensor's version counter only for arguments the schema marks as written
(``Tensor(a!)``). An op that writes an argument it does not mark (``native_batch_norm``'s
``running_mean``) changes the tensor with its counter untouched: nbguard must not trust counters
alone (see nbguard/staging.py). Run: ``python scripts/schema_audit.py``. The list is a reading aid:
an argument named like state may be only read (``found_inf`` of the fused optimizers is).
"""

from __future__ import annotations

import re

import torch

STATE_LIKE = re.compile(r"running|noise|stats|^mean$|^var$|found_inf|growth|buf|state|counts")


def under_declared() -> list[tuple[str, str]]:
    """(op name, argument) pairs: tensors named like state, not declared written."""
    found = set()
    for schema in torch._C._jit_get_all_schemas():
        if not schema.name.startswith("aten::") or schema.name.endswith("_backward") or schema.overload_name.endswith("out"):
            continue
        for arg in schema.arguments:
            written = arg.alias_info is not None and arg.alias_info.is_write
            if "Tensor" in str(arg.type) and not written and STATE_LIKE.search(arg.name):
                found.add((schema.name, arg.name))
    return sorted(found)


if __name__ == "__main__":
    print(f"torch {torch.__version__}")
    for name, arg in under_declared():
        print(f"{name:55s} {arg}")
