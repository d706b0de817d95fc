"""The whole graph on tiny models: fetch -> reference -> export/quantize -> lower -> verify -> publish."""

from __future__ import annotations

import json
import pytest

from xportbuild.keys import SCHEMA
from tests.integration.models import SCALE_LOGITS, local, model_toml


def _published(project, target: str) -> dict:
    return json.loads((project.root / "artifacts" / target / "manifest.json").read_text())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tiny_decoders_build_and_verify_fp32_and_8da8w_shared(project, weights, arch):
    project.write_model(f"tiny-{arch}", model_toml(local(weights / f"tiny-{arch}"), ["xnnpack-fp32", "xnnpack-8da8w-shared"]))
    for recipe in ("xnnpack-fp32", "xnnpack-8da8w-shared"):
        project.doit(f"export:tiny-{arch}-{recipe}")
        manifest = _published(project, f"tiny-{arch}-{recipe}")
        verify = manifest["stages"]["verify"]["result"]
        assert (project.root / "artifacts" / f"tiny-{arch}-{recipe}" / "model.pte").stat().st_size > 0
        # Where the .pte's greedy text leaves float's, its program (same context) chose the same token.
        assert all(g["program_margin_at_divergence"] in (None, 0.0) for g in verify["greedy"]), verify["greedy"]
        assert manifest["stages"]["lower"]["result"]["delegation"]["forward"]["delegate_calls"] > 0
    quantized = _published(project, f"tiny-{arch}-xnnpack-8da8w-shared")["stages"]["quantize"]["result"]["quantized"]
    assert quantized["linear"]["scheme"] == "8da8w" and sum(quantized["linear"]["layers"].values()) > 0
    assert quantized["head"] == {"scheme": "8da8w", "layers": {"per-channel": 1}}
    assert quantized["embedding"] == {"scheme": "8w", "layers": {"per-channel": 1}}
    # The default recipe shares a tied table (gemma3) and says it does nothing for an untied one (llama).
    tied = arch == "gemma3"
    assert bool(quantized["tied_embedding"]["shared_table"]) == tied
    assert ("model.ptd" in _published(project, f"tiny-{arch}-xnnpack-8da8w-shared")["files"]) == tied
    for recipe in ("xnnpack-fp32", "xnnpack-8da8w-shared"):
        runner = _published(project, f"tiny-{arch}-{recipe}")["stages"]["verify"]["result"]["runner"]
        assert runner["matches_pte_greedy"] and runner["text"], runner
    fp32 = _published(project, f"tiny-{arch}-xnnpack-fp32")["stages"]["verify"]["result"]
    assert fp32["vs_reference"]["top1"] == 1.0


def test_portable_backend_delegates_nothing(project, weights):
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["portable-fp32"]))
    project.doit("export:tiny-llama-portable-fp32")
    manifest = _published(project, "tiny-llama-portable-fp32")
    assert manifest["stages"]["lower"]["result"]["delegation"]["forward"]["delegate_calls"] == 0
    assert manifest["stages"]["verify"]["result"]["vs_reference"]["top1"] == 1.0


def test_hub_source_from_offline_cache(project, weights):
    commit = (weights / "hub-commit").read_text()
    source = f'kind = "hub"\nrepo = "tiny-org/tiny-qwen3"\nrevision = "{commit}"'
    project.write_model("tiny-qwen3", model_toml(source, ["xnnpack-fp32"]))
    project.doit("export:tiny-qwen3-xnnpack-fp32")
    fetch = _published(project, "tiny-qwen3-xnnpack-fp32")["stages"]["fetch"]
    assert fetch["inputs"]["source"] == {"repo": "tiny-org/tiny-qwen3", "commit": commit, "reproducible": True}
    assert fetch["result"]["model_type"] == "qwen3"


def test_hub_branch_builds_but_warns_not_reproducible(project, weights):
    source = 'kind = "hub"\nrepo = "tiny-org/tiny-qwen3"\nrevision = "main"'
    project.write_model("tiny-qwen3", model_toml(source, ["xnnpack-fp32"]))
    result = project.doit("fetch:tiny-qwen3")
    assert "not reproducible" in result.stderr
    assert "pin revision" in result.stderr


def test_gguf_source_is_converted_once(project, weights):
    source = f'kind = "gguf"\npath = "{weights / "tiny-llama.gguf"}"'
    project.write_model("tiny-gguf", model_toml(source, ["xnnpack-fp32"], prompts=("hello",), max_seq_len=48))
    project.doit("export:tiny-gguf-xnnpack-fp32")
    assert (project.root / "artifacts" / "tiny-gguf-xnnpack-fp32" / "tokenizer.json").is_file()
    runner = _published(project, "tiny-gguf-xnnpack-fp32")["stages"]["verify"]["result"]["runner"]
    assert runner["matches_pte_greedy"], runner  # a byte-level BPE vocabulary converts to what the runner reads
    before = len(project.events())
    project.write_recipe("xnnpack-fp32-b", (project.root / "recipes/recipes/xnnpack-fp32.toml").read_text()
                         + "\n[lower]\nextract_delegate_segments = false\n")
    project.write_model("tiny-gguf", model_toml(source, ["xnnpack-fp32", "xnnpack-fp32-b"], prompts=("hello",),
                                                max_seq_len=48))
    project.doit("export:tiny-gguf-xnnpack-fp32-b")
    assert not [t for t in project.built_since(before) if t.startswith(("fetch", "reference", "program"))]


def test_a_pte_the_llm_runner_cannot_run_is_not_published(project, weights):
    """A sentencepiece GGUF vocabulary converts with a Metaspace pre-tokenizer, which ExecuTorch's C++ tokenizer
    cannot read: an app could not run this .pte with the runner, so it is not published, and the failure says why."""
    source = f'kind = "gguf"\npath = "{weights / "tiny-llama-spm.gguf"}"'
    project.write_model("tiny-spm", model_toml(source, ["xnnpack-fp32"], prompts=("hello",), max_seq_len=48))
    result = project.doit("export:tiny-spm-xnnpack-fp32", check=False)
    assert result.returncode != 0
    assert "ExecuTorch's LLM runner could not run the .pte on prompt 0" in result.stdout, result.stdout[-3000:]
    assert "tokenizer" in result.stdout.lower()
    assert not (project.root / "artifacts" / "tiny-spm-xnnpack-fp32").exists()


def test_gguf_conversion_depends_only_on_the_gguf(project, weights, tmp_path):
    """Converted files must not record how they were loaded (e.g. offline mode): downstream keys hash them."""
    source = f'kind = "gguf"\npath = "{weights / "tiny-llama.gguf"}"'
    project.write_model("tiny-gguf", model_toml(source, ["xnnpack-fp32"], prompts=("hello",), max_seq_len=48))
    digests = []
    for offline in ("1", "0"):
        project.env.update(HF_HUB_OFFLINE=offline, XPORTBUILD_CACHE=str(tmp_path / f"cache-{offline}"))
        project.doit("fetch:tiny-gguf")
        (record,) = (tmp_path / f"cache-{offline}").glob(f"{SCHEMA}/xxh3_128/*/*/entry.json")
        digests.append(json.loads(record.read_text())["digest"])
    assert digests[0] == digests[1]


def test_wrong_lowering_pass_fails_verification_and_publishes_nothing(project, weights):
    (project.root / "app_passes.py").write_text(SCALE_LOGITS)
    project.write_recipe("xnnpack-broken", (project.root / "recipes/recipes/xnnpack-fp32.toml").read_text()
                         + '\n[lower]\npasses = ["app_passes:scale_logits"]\n')
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["xnnpack-broken"]))
    result = project.doit("export:tiny-llama-xnnpack-broken", check=False)
    assert result.returncode != 0
    assert "verification failed" in result.stdout + result.stderr
    assert "vs program" in result.stdout + result.stderr
    assert not (project.root / "artifacts" / "tiny-llama-xnnpack-broken").exists()


def test_max_seq_len_over_the_model_limit_is_a_clear_error(project, weights):
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["xnnpack-fp32"], max_seq_len=300))
    result = project.doit("export:tiny-llama-xnnpack-fp32", check=False)
    assert result.returncode != 0
    assert "max_seq_len = 300 exceeds the model's max_position_embeddings (256)" in result.stdout + result.stderr
    assert not (project.root / "artifacts" / "tiny-llama-xnnpack-fp32").exists()
