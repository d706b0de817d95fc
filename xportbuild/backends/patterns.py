"""Build XNNPACK's pattern graphs only for a partition they could match.

Two passes of XNNPACK's preprocess look for a pattern in each partition: ConvertToSDPAPass (attention, as the
decomposition of scaled_dot_product_attention leaves it) and ConvertToUpsampleBilinear2d. Each asks for its pattern
graphs, which ExecuTorch makes by exporting and lowering small modules once per process: about 2 s, paid again by
every lower stage, since each runs in a process of its own. A pattern matches a subgraph only if every op of the
pattern is in that subgraph, and every pattern of a pass holds the ops named below; a partition without them gets
an empty pattern list, which is what those passes then find anyway: no match, the same graph.

Tied to the ExecuTorch version it was checked against (`backends.CHECKED_EXECUTORCH`);
tests/integration/test_lower_retrace.py checks each pattern holds its ops and compares .pte bytes with and without.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from xportbuild.backends import executorch_is_checked


@dataclass(frozen=True)
class PatternPass:
    pass_class: str  # "module:class" of the XNNPACK pass that searches for the patterns
    pattern_module: str  # the module whose function the pass calls for its patterns
    function: str
    empty: type  # list or dict: its empty value is what the function returns when no pattern could match
    ops: tuple[str, ...]  # edge ops every pattern of the pass holds


PATTERN_PASSES = (
    PatternPass("executorch.backends.xnnpack._passes.convert_to_sdpa:ConvertToSDPAPass",
                "executorch.backends.xnnpack.partition.graphs.sdpa", "get_graphs", list,
                ("aten._softmax.default", "aten.any.dim")),
    PatternPass("executorch.backends.xnnpack._passes.convert_to_upsample_bilinear2d:ConvertToUpsampleBilinear2d",
                "executorch.backends.xnnpack.partition.graphs.bilinear_2d", "get_graphs_dict", dict,
                ("aten.upsample_bilinear2d.vec",)),
)


def _resolve(reference: str):
    import importlib

    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def edge_op(name: str):
    """The edge dialect op of a name like "aten.any.dim"."""
    from executorch.exir.dialects._ops import ops as exir_ops

    namespace, op, overload = name.split(".")
    return getattr(getattr(getattr(exir_ops.edge, namespace), op), overload)


def _may_match(graph_module, ops: tuple) -> bool:
    targets = {node.target for node in graph_module.graph.nodes if node.op == "call_function"}
    return all(op in targets for op in ops)


@contextmanager
def patterns_only_where_they_could_match():
    """Within the block, XNNPACK's pattern passes get their pattern graphs only for partitions holding every op of
    them; yields the counts of partitions searched and skipped."""
    import importlib

    counts = {"searched": 0, "skipped": 0}
    if not executorch_is_checked():
        yield counts
        return
    originals = []
    for spec in PATTERN_PASSES:
        pass_class = _resolve(spec.pass_class)
        module = importlib.import_module(spec.pattern_module)
        originals.append((pass_class, pass_class.call))
        pass_class.call = _gated(pass_class.call, module, spec, tuple(edge_op(name) for name in spec.ops), counts)
    try:
        yield counts
    finally:
        for pass_class, call in originals:
            pass_class.call = call


def _gated(call, module, spec: PatternPass, ops: tuple, counts: dict):
    def gated_call(self, graph_module):
        if _may_match(graph_module, ops):
            counts["searched"] += 1
            return call(self, graph_module)
        counts["skipped"] += 1
        patterns = getattr(module, spec.function)
        setattr(module, spec.function, spec.empty)
        try:
            return call(self, graph_module)
        finally:
            setattr(module, spec.function, patterns)

    return gated_call
