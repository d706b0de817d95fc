"""Exporting with the skipped work (xportbuild/models/export_shortcuts.py) gives the same program, byte for byte, and
still refuses a dynamic dimension the code pins to one value."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pytest
import torch

from xportbuild import pt2
from xportbuild.models import causal_lm, methods
from xportbuild.models.export_shortcuts import unused_export_work_skipped


def _exported_bytes(model_dir, path, monkeypatch, skipped: bool) -> tuple[bytes, dict]:
    """The tiny decoder's forward exported by the program stage's `export_method`, saved; with `skipped` False,
    its shortcut context is an empty one."""
    from transformers import AutoModelForCausalLM

    entered: list[dict] = []

    @contextmanager
    def recorded():
        with unused_export_work_skipped() as counts:
            entered.append(counts)
            yield counts

    monkeypatch.setattr(methods, "unused_export_work_skipped", recorded if skipped else lambda: nullcontext({}))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    (exportable,) = causal_lm.exportables(model, 32).values()
    pt2.save(methods.export_method("tiny", "forward", exportable), path)
    return path.read_bytes(), entered[0] if entered else {}


def test_a_decoder_exports_to_the_same_bytes_with_the_work_skipped(weights, tmp_path, monkeypatch):
    stock, _ = _exported_bytes(weights / "tiny-llama", tmp_path / "stock.pt2", monkeypatch, skipped=False)
    fast, counts = _exported_bytes(weights / "tiny-llama", tmp_path / "fast.pt2", monkeypatch, skipped=True)
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
