"""Every causal-LM model type of the pinned transformers is in the family sweep or left out with its reason, and the
families left out as refused are refused, before any work, for that cause (derived from their config and code)."""

from __future__ import annotations

import pytest

from tests.families import LEFT_OUT, REFUSED, SWEEP, tiny_config
from xportbuild.models.causal_lm import export_blocker


def test_every_causal_lm_family_is_swept_or_left_out_with_a_reason():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    families = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert not set(SWEEP) & set(LEFT_OUT), "a family is either swept or left out"
    assert not families - set(SWEEP) - set(LEFT_OUT), "a family of transformers that the sweep neither builds nor names"
    assert not set(LEFT_OUT) - families, "a family transformers no longer has"


REFUSED_FAMILIES = sorted(family for family, reason in LEFT_OUT.items() if reason.startswith(REFUSED))


@pytest.mark.parametrize("family", REFUSED_FAMILIES)
def test_a_family_left_out_as_refused_is_refused_for_that_cause(family):
    reason = export_blocker(tiny_config(family))
    assert reason is not None and LEFT_OUT[family].removeprefix(REFUSED) in reason, reason


@pytest.mark.parametrize("family", ["gpt_neox_japanese", "trocr", "llama", "qwen3_next", "mamba2"])
def test_decoders_whose_config_says_is_decoder_false_but_are_decoders_are_not_refused(family):
    assert export_blocker(tiny_config(family)) is None
