"""ExecuTorch's custom SDPA and KV-cache ops: present in the lowered program when asked for, absent otherwise, and
verified against the float model with stock attention, including sliding-window layers past their window."""

from __future__ import annotations

import json

import pytest

from tests.integration.models import local, model_toml

# max_abs: the float model's stock attention and the custom op sum 85 positions in one call in different orders;
# measured 0.0037 on logits near 30 (the tiny head is scaled by 8), so 0.01 (a windowing error is whole logits).
FP32_CUSTOM = (
    'doc = "fp32 with custom ops"\nbackend = "xnnpack"\n[export]\ncustom_sdpa = true\ncustom_kv_cache = true\n'
    "[verify]\nmin_cosine = 0.9999\nmin_top1 = 1.0\nmax_abs = 0.01\nmin_cosine_vs_program = 0.9999\n"
    "max_abs_vs_program = 0.001\n"
)
KV_ONLY = FP32_CUSTOM.replace("custom_sdpa = true\n", "")
# 40 words: with 8 new tokens the context passes tiny gemma3's 64-token sliding window.
LONG_PROMPT = " ".join(["the capital of france is paris and water boils at a temperature"] * 4)


def _manifest(project, target: str) -> dict:
    return json.loads((project.root / "artifacts" / target / "manifest.json").read_text())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_default_recipe_uses_custom_ops_and_plain_ops_variant_does_not(project, weights, arch):
    recipes = ["xnnpack-8da8w-shared", "xnnpack-8da8w-shared-plain-ops"]
    project.write_model(f"tiny-{arch}", model_toml(local(weights / f"tiny-{arch}"), recipes))
    project.doit(*[f"export:tiny-{arch}-{recipe}" for recipe in recipes])
    custom, plain = (_manifest(project, f"tiny-{arch}-{recipe}") for recipe in recipes)
    layers = custom["stages"]["quantize"]["result"]["runner_metadata"]["get_n_layers"]
    assert custom["stages"]["lower"]["result"]["llama_ops"] == {"custom_sdpa": layers, "update_cache": 2 * layers}
    assert plain["stages"]["lower"]["result"]["llama_ops"] == {}
    assert custom["stages"]["quantize"]["result"]["runner_metadata"]["use_sdpa_with_kv_cache"] is True
    assert plain["stages"]["quantize"]["result"]["runner_metadata"]["use_sdpa_with_kv_cache"] is False
    for manifest in (custom, plain):
        assert manifest["stages"]["verify"]["result"]["runner"]["matches_pte_greedy"]


def test_custom_ops_keep_sliding_windows_past_the_window(project, weights):
    """fp32 with custom ops must match the float model (stock attention, windowed masks) token for token."""
    config = json.loads((weights / "tiny-gemma3" / "config.json").read_text())
    project.write_recipe("fp32-custom", FP32_CUSTOM)
    project.write_recipe("fp32-kv-only", KV_ONLY)
    project.write_model("tiny-gemma3", model_toml(local(weights / "tiny-gemma3"), ["fp32-custom", "fp32-kv-only"],
                                                  prompts=(LONG_PROMPT,), max_seq_len=96, max_new_tokens=8))
    project.doit("export:tiny-gemma3-fp32-custom", "export:tiny-gemma3-fp32-kv-only")
    for target, ops in (("tiny-gemma3-fp32-custom", {"custom_sdpa", "update_cache"}),
                        ("tiny-gemma3-fp32-kv-only", {"update_cache"})):
        manifest = _manifest(project, target)
        assert set(manifest["stages"]["lower"]["result"]["llama_ops"]) == ops
        prompt_tokens = manifest["stages"]["verify"]["result"]["runner"]["prompt_tokens"]
        assert prompt_tokens + 8 > config["sliding_window"], "the test must pass the window"
        assert manifest["stages"]["verify"]["result"]["vs_reference"]["top1"] == 1.0


def test_custom_sdpa_needs_the_custom_cache(project, weights):
    project.write_recipe("sdpa-only", FP32_CUSTOM.replace("custom_kv_cache = true\n", ""))
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["sdpa-only"]))
    result = project.doit("list", check=False)
    assert result.returncode != 0
    assert "sdpa-only.toml: export.custom_sdpa: true needs custom_kv_cache = true" in result.stdout + result.stderr
