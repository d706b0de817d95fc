"""Decoders whose cache keeps states (convolution, state-space, linear attention): the exported method carries them
between calls as an app's generation loop makes them, and families that cannot carry them are refused for the cause
their code shows."""

from __future__ import annotations

import pytest
import torch

from tests.families import tiny_config
from xportbuild.errors import StageError
from xportbuild.models import causal_lm, state_cache
from xportbuild.models.methods import ExportableMethod, export_method
from xportbuild.recipe.spec import STOCK_OPS

MAX_SEQ_LEN = 16
# Float32 on CPU: the exported program and eager run the same ops in the same order up to fused reshapes.
EXACT = 1e-4


def _tiny_decoder(model_type: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    assert causal_lm.export_blocker(model.config) is None
    return model


def _prefill_then_decode(program, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    logits = [program(tokens[:, :prefill], torch.arange(prefill))]
    logits += [program(tokens[:, at:at + 1], torch.tensor([at])) for at in range(prefill, tokens.shape[1])]
    return torch.cat(logits, dim=1)


# Short convolutions beside attention (LFM2), the gated delta rule beside attention (Qwen3-Next), Mamba 2 alone.
@pytest.mark.parametrize("model_type", ["lfm2", "qwen3_next", "mamba2"])
def test_a_state_decoder_program_carries_its_state_and_starts_a_new_sequence_at_position_zero(model_type):
    model = _tiny_decoder(model_type)
    first, second = torch.tensor([[5, 9, 17, 3, 22, 40]]), torch.tensor([[7, 1, 30, 30, 12, 8]])
    with torch.no_grad():
        expected = {0: model(first).logits, 1: model(second).logits}
        program = export_method(model_type, "forward", causal_lm.exportables(model, MAX_SEQ_LEN, STOCK_OPS)["forward"])
        runnable = program.module()
        got_first = _prefill_then_decode(runnable, first, prefill=4)
        got_second = _prefill_then_decode(runnable, second, prefill=3)  # after the first: its states must not leak
    assert (got_first - expected[0]).abs().max() < EXACT
    assert (got_second - expected[1]).abs().max() < EXACT
    states = [name for name, _ in program.named_buffers() if "_state_" in name]
    assert states, "the states are buffers of the exported method"


def _gated_delta_inputs(tokens: int, generator: torch.Generator) -> dict:
    shape = (1, tokens, 2, 8)
    return {"query": torch.randn(shape, generator=generator), "key": torch.randn(shape, generator=generator),
            "value": torch.randn(shape, generator=generator),
            "g": -torch.rand((1, tokens, 2), generator=generator), "beta": torch.rand((1, tokens, 2), generator=generator),
            "initial_state": torch.randn((1, 2, 8, 8), generator=generator), "output_final_state": True,
            "use_qk_l2norm_in_kernel": True, "chunk_size": 4}


def _mamba2_inputs(tokens: int, generator: torch.Generator) -> dict:
    return {"hidden_states": torch.randn((1, tokens, 2, 4), generator=generator),
            "dt": torch.randn((1, tokens, 2), generator=generator), "A": -torch.rand(2, generator=generator) - 0.5,
            "B": torch.randn((1, tokens, 1, 3), generator=generator),
            "C": torch.randn((1, tokens, 1, 3), generator=generator), "chunk_size": 4, "D": torch.ones(2),
            "dt_bias": torch.randn(2, generator=generator), "initial_states": torch.randn((1, 2, 4, 3), generator=generator),
            "dt_softplus": True, "dt_limit": (1e-3, float("inf")), "return_final_states": True}


@pytest.mark.parametrize(("module_name", "kernel", "inputs"), [
    ("transformers.models.qwen3_next.modeling_qwen3_next", "torch_chunk_gated_delta_rule", _gated_delta_inputs),
    ("transformers.models.nemotron_h.modeling_nemotron_h", "mamba2_chunk_scan", _mamba2_inputs),
])
@pytest.mark.parametrize("tokens", [1, 3, 5, 8])
def test_a_chunked_scan_padded_to_a_fixed_length_gives_what_it_gives_unpadded(module_name, kernel, inputs, tokens):
    """Padding tokens leave the state as it is (Nemotron-H's least time step decays it: that is undone)."""
    import importlib

    stock = getattr(importlib.import_module(module_name), kernel)
    arguments = inputs(tokens, torch.Generator().manual_seed(tokens))
    padded = state_cache._fixed_length(stock, state_cache.CHUNKED_SCANS[kernel], max_tokens=10)
    expected, got = stock(**arguments), padded(**arguments)
    assert got[0].shape == expected[0].shape
    for mine, theirs in zip(got[:2], expected[:2]):
        assert (mine - theirs).abs().max() < EXACT


class _FixedLength(torch.nn.Module):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.reshape(1, 6) * 2  # holds for 6 tokens only: torch.export fixes the length


def test_a_method_whose_code_fixes_a_dynamic_length_is_not_exportable():
    exportable = ExportableMethod(_FixedLength(), (torch.ones((1, 6)),),
                                  {"tokens": {1: torch.export.Dim("tokens", min=1, max=16)}})
    with pytest.raises(StageError, match="tiny: method forward is not exportable"):
        export_method("tiny", "forward", exportable)


def test_state_layers_are_told_from_key_value_layers():
    assert state_cache.has_state_layers(tiny_config("lfm2"))
    assert not state_cache.has_state_layers(tiny_config("llama"))
