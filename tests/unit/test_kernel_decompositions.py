"""Operators the ExecuTorch runtime has no kernel for (a sort; complex rotary embeddings) are rewritten by every
lowering into ones it has, with the values the model computes."""

from __future__ import annotations

import pytest
import torch

from xportbuild import passes
from xportbuild.runtime import missing_kernels

EXACT = 1e-5  # float32, the same arithmetic up to the order of a complex product's terms


class ExpertOrder(torch.nn.Module):
    """A router's expert ids in order, as JetMoE groups its tokens."""

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        experts = scores.argmax(-1).flatten()
        ordered, order = experts.sort(0)
        return ordered * 100 + experts[order]


class ComplexRotary(torch.nn.Module):
    """Llama 4's rotary embedding: angles as unit complex numbers, pairs of features rotated by them."""

    def forward(self, features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions[:, None].float() * torch.tensor([1.0, 0.1, 0.01, 0.001])
        rotations = torch.polar(torch.ones_like(angles), angles).to(torch.complex64) * 1.0
        pairs = torch.view_as_complex(features.float().reshape(*features.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * rotations.unsqueeze(0)).flatten(2)


CASES = {
    "sort": (ExpertOrder(), (torch.randn(1, 7, 4),), "aten::sort.values", passes.sort_as_topk),
    "complex rotary": (ComplexRotary(), (torch.randn(1, 5, 8), torch.arange(5)), "aten::polar.out",
                       passes.complex_as_real),
}


def _executorch_program(program):
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(program, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    return edge.to_executorch().executorch_program


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_operator_without_a_kernel_is_rewritten_into_ones_with_kernels_and_the_same_values(case):
    module, example, missing_operator, rewrite = CASES[case]
    with torch.no_grad():
        expected = module(*example)
        stock = torch.export.export(module, example, strict=True)
        assert missing_operator in missing_kernels(_executorch_program(stock))  # what the runtime cannot run

        rewritten = rewrite(torch.export.export(module, example, strict=True))
        assert (rewritten.module()(*example) - expected).abs().max() <= EXACT
        assert not missing_kernels(_executorch_program(rewritten))


def test_every_lowering_runs_the_rewrites():
    assert {"sort_as_topk", "complex_as_real"} <= set(passes.EVERY_LOWERING)
