"""Two pieces of work strict torch.export does for nothing, skipped while a method is exported.

TorchDynamo, recording each call of a traced method, names the function of its source line for a debug log line
(`trace_call`, `trace_source`) that is off unless asked for; to name it, it tokenizes every source file it meets (the
model's modeling file, torch.nn's, transformers' utilities) once per process, and every stage is a process of its
own. Here the name is looked up only when one of those logs is on.

Export then builds the guard function of the traced frame, to raise any shape-constraint violation (those come from
the shape environment, before the function's code is written), and throws the function away. Its Python source is
first shortened by a common-subexpression pass that unparses every sub-tree of every guard expression (a fifth of
exporting a small decoder); the pass only names repeated sub-expressions, so the code without it checks the same.

One-layer phi3, each stage in a process of its own: program 1.96 -> 1.80 s, quantize 2.53 -> 2.20 s. Tied to the
torch version it was checked against; tests/unit/test_export_shortcuts.py exports with and without, compares the
archives byte for byte, and checks that a constraint violation is still raised.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

CHECKED_TORCH = "2.13.0"


@contextmanager
def unused_export_work_skipped():
    """Within the block, torch.export skips the two; yields how often each was skipped."""
    import torch

    counts = {"funcname_lookups": 0, "guard_code_shortenings": 0}
    if torch.__version__.split("+")[0] != CHECKED_TORCH:
        yield counts
        return
    from torch._dynamo import guards, symbolic_convert

    stock = symbolic_convert.get_funcname, guards.PyExprCSEPass.count, guards.PyExprCSEPass.replace
    logs = (symbolic_convert.trace_call_log, symbolic_convert.trace_source_log)

    def get_funcname(filename: str, lineno: int):
        if any(log.isEnabledFor(logging.DEBUG) for log in logs):
            return stock[0](filename, lineno)
        counts["funcname_lookups"] += 1
        return None

    def count(self, exprs) -> None:
        counts["guard_code_shortenings"] += 1

    def replace(self, expr: str):
        return [], expr

    symbolic_convert.get_funcname = get_funcname
    guards.PyExprCSEPass.count, guards.PyExprCSEPass.replace = count, replace
    try:
        yield counts
    finally:
        symbolic_convert.get_funcname = stock[0]
        guards.PyExprCSEPass.count, guards.PyExprCSEPass.replace = stock[1], stock[2]
