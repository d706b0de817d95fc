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


def test_pte_greedy_matches_the_quantized_program_for_16_tokens(manifest):
    """The .pte's 16 greedy tokens equal those of the quantized model it was lowered from (run eagerly in
    PyTorch by verify), except a first difference at a near-tie within the recipe's greedy_tie_margin
    (dynamically quantized activations are not bit-exact across kernels)."""
    margin = manifest["stages"]["verify"]["params"]["tolerances"]["greedy_tie_margin"]
    for item in manifest["stages"]["verify"]["result"]["greedy"]:
        assert len(item["pte"]) >= 16 and len(item["program"]) == len(item["pte"])
        if item["diverges_from_program_at"] is not None:
            assert item["program_margin_at_divergence"] <= margin


def test_default_scheme_is_smaller_than_the_peers_and_closer_to_float(manifest):
    """The peers' scheme measured here: 320 MB .pte, top-1 agreement with float 0.72 (tests/bench/schemes.py)."""
    assert manifest["stages"]["lower"]["result"]["pte_bytes"] <= 320_000_000
    by_stage = manifest["stages"]["verify"]["result"]["quality_by_stage"]
    assert by_stage[".pte"]["top1"] >= 0.8 and by_stage["quantized eager"]["top1"] >= 0.8


def test_reference_continuation_is_the_known_float_text(manifest):
    texts = manifest["stages"]["reference"]["result"]["texts"]
    assert texts[0]["continuation"].startswith(" the capital of the country of France")


def test_no_op_rebuild_imports_no_torch():
    code = ("import sys\nfrom doit.doit_cmd import DoitMain\nfrom doit.cmd_base import ModuleTaskLoader\nimport dodo\n"
            f"rc = DoitMain(ModuleTaskLoader(dodo)).run(['export:{TARGET}'])\n"
            "print('TORCH', 'torch' in sys.modules)\nsys.exit(rc)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "TORCH False" in result.stdout, result.stdout + result.stderr
