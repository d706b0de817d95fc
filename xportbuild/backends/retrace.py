"""Skip the fake-tensor retrace of an XNNPACK preprocess pass that changed nothing.

XNNPACK preprocesses each partition with its pass list (about 17 passes). A pass of that list rewrites the graph in
its own `call` and ends with `super().call(...)`: ExportPass re-runs every node of the partition on fake tensors to
refresh their metadata, whether or not the pass rewrote anything. Most passes find nothing to rewrite in a decoder
(no batch norm, no concatenation, no PReLU, no upsampling...), so most of that work re-derives what is already
there. Here the retrace is skipped when the partition's graph text is the same as when the pass started: node
targets, arguments and order unchanged means the retrace would recompute the same values. A pass that rewrites
inside the retrace (it overrides `call_operator`, as ConstPropPass does) is never skipped, because its `call` is
ExportPass's own.

The patch is tied to the ExecuTorch version it was checked against (`backends.CHECKED_EXECUTORCH`;
tests/integration/test_lower_retrace.py lowers with and without it and compares the .pte bytes).
"""

from __future__ import annotations

from contextlib import contextmanager

from xportbuild.backends import executorch_is_checked

_ENTRY_GRAPH = "_xportbuild_entry_graph"


def _graph_text(graph_module) -> str:
    return str(graph_module.graph)


def _rewrites_in_own_call(pass_class, export_pass_class) -> bool:
    return pass_class.call is not export_pass_class.call and "call_operator" not in vars(pass_class)


@contextmanager
def skip_unchanged_retraces():
    """Within the block, XNNPACK's preprocess passes skip their retrace when they changed nothing; yields the
    counts of retraces skipped and run."""
    import executorch.exir.pass_base as pass_base
    from executorch.backends.xnnpack._passes import XNNPACKPassManager

    counts = {"skipped": 0, "run": 0}
    if not executorch_is_checked():
        yield counts
        return
    skippable = {cls for cls in XNNPACKPassManager(None).passes if _rewrites_in_own_call(cls, pass_base.ExportPass)}
    base_call, pass_entry = pass_base._ExportPassBase.call, pass_base.ExportPass.__call__
    own_entry = "__call__" in vars(pass_base.ExportPass)

    def entry(self, graph_module):
        if type(self) in skippable:
            setattr(self, _ENTRY_GRAPH, _graph_text(graph_module))
        return pass_entry(self, graph_module)

    def retrace(self, graph_module):
        from torch.fx.passes.infra.pass_base import PassResult

        entry_graph = self.__dict__.pop(_ENTRY_GRAPH, None)
        if entry_graph is not None and entry_graph == _graph_text(graph_module):
            counts["skipped"] += 1
            return PassResult(graph_module, False)
        counts["run"] += 1
        return base_call(self, graph_module)

    pass_base.ExportPass.__call__, pass_base._ExportPassBase.call = entry, retrace
    try:
        yield counts
    finally:
        pass_base._ExportPassBase.call = base_call
        if own_entry:
            pass_base.ExportPass.__call__ = pass_entry
        else:
            del pass_base.ExportPass.__call__
