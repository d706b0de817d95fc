"""GPTQ rounding: on correlated inputs it changes a layer's outputs less than rounding to nearest, and its codes and
scales are what the delegate stores (scales exact in bfloat16, codes within the 4-bit range)."""

from __future__ import annotations

import torch

from xportbuild.calibration import gptq_round


def _correlated_inputs(rows: int, basis: torch.Tensor, generator) -> torch.Tensor:
    """Inputs whose features share a few directions (`basis`), as a transformer's hidden states do."""
    mixed = torch.randn(rows, basis.shape[0], generator=generator) @ basis
    return mixed + 0.05 * torch.randn(rows, basis.shape[1], generator=generator)


def _nearest(weight: torch.Tensor, group: int) -> torch.Tensor:
    groups = weight.reshape(weight.shape[0], -1, group)
    scale = (groups.abs().amax(dim=-1, keepdim=True) / 7.5).to(torch.bfloat16).float()
    return (torch.clamp(torch.round(groups / scale), -8, 7) * scale).reshape(weight.shape)


def test_gptq_changes_outputs_less_than_nearest_rounding_on_the_same_grid():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 128, generator=generator)
    basis = torch.randn(8, 128, generator=generator)
    calibration, held_out = (_correlated_inputs(512, basis, generator) for _ in range(2))
    codes, scales = gptq_round(weight, calibration.T @ calibration / 512, 4, 32, torch.bfloat16, 0.01)
    gptq = codes.float() * scales.repeat_interleave(32, dim=1)
    assert codes.min() >= -8 and codes.max() <= 7
    assert torch.equal(scales.to(torch.bfloat16).float(), scales)
    gptq_error = (held_out @ (weight - gptq).T).square().mean()
    nearest_error = (held_out @ (weight - _nearest(weight, 32)).T).square().mean()
    assert gptq_error < 0.5 * nearest_error, (gptq_error, nearest_error)


def test_gptq_on_uncorrelated_inputs_rounds_to_nearest_on_its_scales():
    """With uncorrelated inputs there is nothing to compensate through: every code is the nearest one on GPTQ's
    scales, and those scales clip the min-max range at most (never widen it)."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 64, generator=generator)
    codes, scales = gptq_round(weight, torch.eye(64), 4, 32, torch.bfloat16, 0.01)
    per_column = scales.repeat_interleave(32, dim=1)
    assert torch.equal(codes.float(), torch.clamp(torch.round(weight / per_column), -8, 7))
    min_max = (weight.reshape(16, 2, 32).abs().amax(dim=-1) / 7.5).to(torch.bfloat16).float()
    assert bool((scales <= min_max).all()) and bool((scales < min_max).any())
