"""Generate a graph module's Python code when it runs, not every time its graph changes.

A torch.fx GraphModule turns its graph into Python source and compiles it on construction and on every
`recompile()`. Lowering builds or recompiles graph modules about a thousand times for a tiny decoder (each pass of
each partition, each pass manager's check after it), and runs few of them: the code of most is never used. Within
the block, every GraphModule built is torch's own `_LazyGraphModule`, which marks the code stale on `recompile()`
and generates it the first time the module is called or its code or text is read (torch's compilers use it for the
same reason). The graph, what a pass reads and ExecuTorch serializes, is the same object either way.

Tied to the ExecuTorch version it was checked against (`backends.CHECKED_EXECUTORCH`);
tests/integration/test_lower_retrace.py lowers with and without it and compares the .pte bytes.
"""

from __future__ import annotations

from contextlib import contextmanager

from xportbuild.backends import executorch_is_checked


@contextmanager
def code_generated_when_run():
    """Within the block, new GraphModules generate their code lazily; yields the count of modules made lazy."""
    from torch.fx import GraphModule
    from torch.fx._lazy_graph_module import _LazyGraphModule

    counts = {"lazy_modules": 0}
    if not executorch_is_checked():
        yield counts
        return
    stock_new = GraphModule.__dict__["__new__"]

    def new(cls, *args, **kwargs):
        if cls is GraphModule:
            counts["lazy_modules"] += 1
            cls = _LazyGraphModule
        return stock_new(cls, *args, **kwargs)

    GraphModule.__new__ = staticmethod(new)
    try:
        yield counts
    finally:
        GraphModule.__new__ = stock_new
