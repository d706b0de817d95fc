"""The real target: Gemma 3 270M (GGUF from PyPI) -> gemma3-xnnpack-8da4w, built in this repo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TARGET = "gemma3-xnnpack-8da4w"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def manifest() -> dict:
    result = subprocess.run([sys.executable, "-m", "doit", f"export:{TARGET}"], cwd=REPO, capture_output=True,
                            text=True, timeout=3600)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    return json.loads((REPO / "artifacts" / TARGET / "manifest.json").read_text())


def _quantized_eager_greedy(fetch_dir: Path, prompt: list[int], count: int) -> list[int]:
    """Independent of verify: quantize the eager model again and decode greedily in PyTorch."""
    from xportbuild.models import causal_lm
    from xportbuild.recipe import load_project
    from xportbuild.stages.quantize import quantize_model

    target = next(t for t in load_project(REPO / "recipes") if t.name == TARGET)
    model = causal_lm.load_model(fetch_dir)
    quantize_model(model, target.recipe.quantize)
    step = causal_lm.module_step(causal_lm.exportable(model, target.model.max_seq_len))
    return causal_lm.greedy(step, prompt, count)


def test_pte_greedy_equals_quantized_eager_model_for_16_tokens(manifest):
    from xportbuild.cache import Store

    verify = manifest["stages"]["verify"]["result"]
    fetch_key = manifest["stages"]["fetch"]["key"]
    cache = REPO / ".xportbuild" / "cache"
    fetch_dir = Store(cache).entry_path(fetch_key)
    for item, prompt_ids in zip(verify["greedy"], _prompts(fetch_dir, manifest)):
        assert len(item["pte"]) >= 16
        assert item["pte"] == _quantized_eager_greedy(fetch_dir, prompt_ids, len(item["pte"]))


def _prompts(fetch_dir: Path, manifest: dict) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fetch_dir)
    texts = manifest["stages"]["reference"]["result"]["texts"]
    return [tokenizer(t["prompt"])["input_ids"] for t in texts]


def test_reference_continuation_is_the_known_float_text(manifest):
    texts = manifest["stages"]["reference"]["result"]["texts"]
    assert texts[0]["continuation"].startswith(" the capital of the country of France")


def test_no_op_rebuild_imports_no_torch():
    code = ("import sys\nfrom doit.doit_cmd import DoitMain\nfrom doit.cmd_base import ModuleTaskLoader\nimport dodo\n"
            f"rc = DoitMain(ModuleTaskLoader(dodo)).run(['export:{TARGET}'])\n"
            "print('TORCH', 'torch' in sys.modules)\nsys.exit(rc)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "TORCH False" in result.stdout, result.stdout + result.stderr
