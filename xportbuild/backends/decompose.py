"""The last of the three full-graph decompositions ExecuTorch runs before partitioning often has nothing to do.

For a method with a partitioner that filters ops (XNNPACK does), `to_edge_transform_and_lower` retraces the whole
program three times: `run_decompositions({})` to functionalize it, `run_decompositions(table without the
partitioner's ops)`, then, after swapping the ops the partitioner accepts for placeholders, `run_decompositions(
default table)` for the ops it refused. Each retrace runs every node on fake tensors with symbolic shapes (about
1.5 s for a two-layer toy decoder, half a minute for Gemma 3 270M). The third has nothing to do when the second
left no op it would decompose (the partitioner accepted every op it asked to keep): then it is skipped.

(Folding the first into the second, which functionalizes too, was tried and dropped: it changes the .pte bytes of
multi-method models and of a method lowered without a partitioner.)

Tied to the ExecuTorch version it was checked against (`backends.CHECKED_EXECUTORCH`), as `retrace.py` is;
tests/integration/test_lower_retrace.py lowers with and without it and compares the .pte bytes.
"""

from __future__ import annotations

from contextlib import contextmanager

from xportbuild.backends import executorch_is_checked

# Shape queries are in the default table but decompose to themselves.
_SHAPE_OPS = ("sym_size", "sym_stride", "sym_numel", "sym_storage_offset")
# A functional graph's in-place custom ops (the KV cache update) are wrapped in these, which a retrace of a functional
# graph emits again as they are.
_FUNCTIONAL_WRAPPERS = ("auto_functionalized", "auto_functionalized_v2")


@contextmanager
def fewer_decompositions():
    """Within the block, a decomposition of a program decomposed in the block that holds nothing to decompose is
    skipped; yields the counts."""
    from torch.export import ExportedProgram

    counts = {"skipped": 0, "run": 0}
    if not executorch_is_checked():
        yield counts
        return
    stock = ExportedProgram.run_decompositions
    decomposed: list = []  # programs a decomposition with a table produced in this block: functional, core ATen

    def run_decompositions(self, decomp_table=None, decompose_custom_triton_ops=False):
        if decomp_table is not None and _in(self, decomposed) and not _holds_decomposable(self, decomp_table):
            counts["skipped"] += 1
            return self
        counts["run"] += 1
        result = stock(self, decomp_table, decompose_custom_triton_ops)
        if decomp_table:
            decomposed.append(result)
        return result

    ExportedProgram.run_decompositions = run_decompositions
    try:
        yield counts
    finally:
        ExportedProgram.run_decompositions = stock


def _in(program, programs: list) -> bool:
    return any(program is other for other in programs)


def _holds_decomposable(program, table) -> bool:
    """Whether a retrace with `table` would change an op: one in the table, one with an implicit decomposition, or
    a higher-order op other than the functional wrappers (not looked into)."""
    import torch

    implicit = torch._C.DispatchKey.CompositeImplicitAutograd
    graphs = [module.graph for module in program.graph_module.modules() if isinstance(module, torch.fx.GraphModule)]
    for graph in graphs:
        for node in graph.nodes:
            if node.op != "call_function" or getattr(node.target, "__module__", "") == "_operator":
                continue
            if isinstance(node.target, torch._ops.HigherOrderOperator) and node.target.name() in _FUNCTIONAL_WRAPPERS:
                continue
            if not isinstance(node.target, torch._ops.OpOverload):
                return True
            if node.target.__name__.split(".")[0] in _SHAPE_OPS:
                continue
            if node.target in table or node.target.has_kernel_for_dispatch_key(implicit):
                return True
    return False
