"""The XNNPACK backend module's partitioner leaves out of its partitions what XNNPACK's own preprocess would refuse,
so the lowering succeeds with that node on portable kernels; what XNNPACK does take stays delegated."""

from __future__ import annotations

import pytest
import torch


class MaxOver(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return torch.relu(x).max(dim=self.dim, keepdim=True).values * 2


def _top_level_ops(program) -> list[str]:
    return [str(node.target) for node in program.exported_program().graph.nodes if node.op == "call_function"]


def test_a_max_xnnpack_would_refuse_runs_on_portable_kernels_and_one_it_takes_stays_delegated():
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    from xportbuild import backends
    from xportbuild.recipe.spec import LowerSpec

    example = (torch.randn(1, 2, 3, 4),)
    refused = torch.export.export(MaxOver(-1), example)
    with pytest.raises(RuntimeError, match="amax.default only supports dim == 2 or dim == 3"):
        to_edge_transform_and_lower(refused, partitioner=[XnnpackPartitioner()]).to_executorch()  # stock

    lowered = to_edge_transform_and_lower(refused, partitioner=backends.partitioners(LowerSpec("xnnpack")))
    assert any("max" in op for op in _top_level_ops(lowered))  # left out of the delegate
    assert any("executorch_call_delegate" in op for op in _top_level_ops(lowered))  # relu, mul still delegated
    program = lowered.to_executorch().buffer  # held: the runtime reads the program from this memory
    output = _load_for_executorch_from_buffer(program).run_method("forward", example)[0]
    torch.testing.assert_close(output, MaxOver(-1)(*example))

    taken = to_edge_transform_and_lower(torch.export.export(MaxOver(3), example),
                                        partitioner=backends.partitioners(LowerSpec("xnnpack")))
    assert not any("max" in op for op in _top_level_ops(taken))  # dim 3 with keepdim: XNNPACK runs it
