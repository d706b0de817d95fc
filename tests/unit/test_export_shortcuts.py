"""Exporting with the skipped work (xportbuild/models/export_shortcuts.py) gives the same program, byte for byte, and
still refuses a dynamic dimension the code pins to one value."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from xportbuild import pt2
from xportbuild.models import causal_lm
from xportbuild.models.export_shortcuts import unused_export_work_skipped


def _exported_bytes(model_dir, path, skipped: bool) -> tuple[bytes, dict]:
    """The tiny decoder's forward exported as the program stage does (strict, dynamic length), saved."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    (exportable,) = causal_lm.exportables(model, 32).values()
    with torch.no_grad(), (unused_export_work_skipped() if skipped else nullcontext({})) as counts:
        program = torch.export.export(exportable.module, exportable.example, dynamic_shapes=exportable.dynamic_shapes,
                                      strict=True)
    pt2.save(program, path)
    return path.read_bytes(), counts


def test_a_decoder_exports_to_the_same_bytes_with_the_work_skipped(weights, tmp_path):
    stock, _ = _exported_bytes(weights / "tiny-llama", tmp_path / "stock.pt2", skipped=False)
    fast, counts = _exported_bytes(weights / "tiny-llama", tmp_path / "fast.pt2", skipped=True)
    assert counts["funcname_lookups"] > 0 and counts["guard_code_shortenings"] > 0, counts
    assert fast == stock


def test_a_dynamic_dimension_the_code_pins_is_still_refused():
    class PinsItsLength(torch.nn.Module):
        def forward(self, tokens):
            return tokens.reshape(2, 4)  # only a length of 8 reshapes to 2 x 4

    length = torch.export.Dim("length", min=2, max=64)
    with unused_export_work_skipped() as counts, pytest.raises(Exception, match="length"):
        torch.export.export(PinsItsLength(), (torch.ones(8),), dynamic_shapes=({0: length},), strict=True)
    assert counts["guard_code_shortenings"] + counts["funcname_lookups"] > 0
