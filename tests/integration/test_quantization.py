"""Quantization knobs take effect and their cost in quality is visible per stage: head and embedding schemes on
tied (Gemma 3) and untied (Llama) tiny models, the qparams algorithm, KL limits and the sensitivity report."""

from __future__ import annotations

import json

from tests.integration.models import local, model_toml

BASE = "xnnpack-8da8w-shared"
RECIPE = '''doc = "{doc}"
backend = "xnnpack"
[quantize]
linear = "8da4w"
linear_group_size = 32
{extra}
[verify]
min_cosine = 0.8
min_top1 = 0.5
max_abs = 100.0
min_cosine_vs_program = 0.93
max_abs_vs_program = 8.0
greedy_tie_margin = 0.5
'''
VARIANTS = {
    "plain": 'embedding = "8w"',
    "head-float": 'head = "none"\nembedding = "8w"',
    "head-8bit": 'head = "8da8w"\nembedding = "8w"',
    "embedding-4bit": 'embedding = "4w"\nembedding_group_size = 32',
    "shared": 'head = "8da8w"\nembedding = "8w"\ntied_table = "shared"',
}


def _manifest(project, target: str) -> dict:
    return json.loads((project.root / "artifacts" / target / "manifest.json").read_text())


def test_head_and_embedding_schemes_change_sizes_and_ops_on_a_tied_model(project, weights):
    """Variants of a plain scheme (linears and head 8da4w group 32, embeddings 8w), one knob each."""
    for name, extra in VARIANTS.items():
        project.write_recipe(name, RECIPE.format(doc=name, extra=extra))
    project.write_model("tiny-llama-tied", model_toml(local(weights / "tiny-llama-tied"), list(VARIANTS)))
    project.doit(*[f"export:tiny-llama-tied-{r}" for r in VARIANTS])
    manifests = {r: _manifest(project, f"tiny-llama-tied-{r}") for r in VARIANTS}
    pte = {r: m["stages"]["lower"]["result"]["pte_bytes"] for r, m in manifests.items()}
    quantized = {r: m["stages"]["quantize"]["result"]["quantized"] for r, m in manifests.items()}
    quant_ops = {r: m["stages"]["quantize"]["result"]["methods"]["forward"]["quant_ops"] for r, m in manifests.items()}

    assert quantized["plain"]["head"] == {"scheme": "8da4w", "layers": {"group 32": 1}}
    assert quantized["plain"]["tied_embedding"] == {"tied_in_float": True, "quantized_copies": 2}
    assert "head" not in quantized["head-float"]
    assert quantized["head-8bit"]["head"] == {"scheme": "8da8w", "layers": {"per-channel": 1}}
    assert quantized["embedding-4bit"]["embedding"] == {"scheme": "4w", "layers": {"group 32": 1}}
    # A float head keeps 4-byte weights, an 8-bit one 1 byte, the 4-bit default half a byte (plus scales).
    assert pte["head-float"] > pte["head-8bit"] > pte["plain"]
    assert pte["embedding-4bit"] < pte["plain"]
    assert quant_ops["head-float"] < quant_ops["plain"]
    for manifest in manifests.values():
        stages = manifest["stages"]["verify"]["result"]["quality_by_stage"]
        assert set(stages) == {"quantized eager", "program", ".pte"}
        assert all(0.0 <= s["kl_mean"] and 0.0 <= s["top1"] <= 1.0 for s in stages.values())
    _assert_one_shared_table(project, manifests["shared"], manifests["head-8bit"])
    report = (project.root / "artifacts" / "tiny-llama-tied-plain" / "report.md").read_text()
    assert "## Quality by stage" in report and "| quantized eager |" in report and "| .pte |" in report


def _assert_one_shared_table(project, shared: dict, copies: dict) -> None:
    """Same scheme as `copies` (8-bit head and embedding), but one table in the external data file."""
    quantized = shared["stages"]["quantize"]["result"]["quantized"]["tied_embedding"]
    lowered, lowered_copies = shared["stages"]["lower"]["result"], copies["stages"]["lower"]["result"]
    vocab, hidden = quantized["shared_table"]
    assert quantized["quantized_copies"] == 1
    assert lowered["shared_table"]["table_bytes"] == vocab * hidden
    assert "ptd_bytes" not in lowered_copies and lowered["ptd_bytes"] < 2 * vocab * hidden
    saved = lowered_copies["artifact_bytes"] - lowered["artifact_bytes"]
    assert 0.9 * vocab * hidden <= saved <= 1.1 * vocab * hidden, (saved, vocab * hidden)
    assert "model.ptd" in shared["files"]
    assert (project.root / "artifacts" / shared["target"] / "model.ptd").is_file()
    # One table read by both kernels computes what two identical copies compute.
    numbers = [m["stages"]["verify"]["result"]["quality_by_stage"][".pte"] for m in (shared, copies)]
    assert numbers[0]["top1"] == numbers[1]["top1"]
    assert abs(numbers[0]["cosine_mean"] - numbers[1]["cosine_mean"]) < 1e-6


def test_head_scheme_and_qparams_on_an_untied_model(project, weights):
    project.write_recipe("head-8bit", RECIPE.format(doc="h", extra=VARIANTS["head-8bit"]))
    project.write_recipe("affine", RECIPE.format(doc="affine", extra=""))
    project.write_recipe("hqq", RECIPE.format(doc="hqq", extra='qparams = "hqq"'))
    project.write_recipe("g64", RECIPE.format(doc="g64", extra="").replace("linear_group_size = 32", "linear_group_size = 64"))
    recipes = [BASE, "head-8bit", "affine", "hqq", "g64"]
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), recipes))
    project.doit(*[f"quantize:tiny-llama-{r}" for r in recipes])
    results = {r: project.entry(f"quantize:tiny-llama-{r}") for r in recipes}
    assert results["head-8bit"].result["quantized"]["head"] == {"scheme": "8da8w", "layers": {"per-channel": 1}}
    assert results["affine"].result["quantized"]["head"] == {"scheme": "8da4w", "layers": {"group 32": 1}}
    assert "tied_embedding" not in results["affine"].result["quantized"]
    assert results["hqq"].digest != results["affine"].digest  # other scales: other program
    # 64 does not divide the 96-wide down_proj of each block: those fall back to per-channel.
    blocks = json.loads((weights / "tiny-llama" / "config.json").read_text())["num_hidden_layers"]
    assert results["g64"].result["quantized"]["linear"]["layers"] == {"group 64": 6 * blocks, "per-channel": blocks}


def test_shared_table_on_an_untied_model_is_reported_not_applied(project, weights):
    project.write_recipe("shared", RECIPE.format(doc="s", extra=VARIANTS["shared"]))
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["shared"]))
    result = project.doit("export:tiny-llama-shared")
    assert 'quantize.tied_table = "shared" does nothing for this model' in result.stdout + result.stderr
    manifest = _manifest(project, "tiny-llama-shared")
    assert manifest["stages"]["quantize"]["result"]["quantized"]["tied_embedding"] == {
        "tied_in_float": False, "shared_table": None}
    assert "model.ptd" not in manifest["files"]


def test_kl_limit_fails_verification_with_the_number(project, weights):
    model = model_toml(local(weights / "tiny-llama"), [BASE])
    project.write_model("tiny-llama", model)
    project.doit(f"export:tiny-llama-{BASE}")
    project.write_model("tiny-llama", model.replace("max_kl = 10.0", "max_kl = 0.0"))
    result = project.doit(f"export:tiny-llama-{BASE}", check=False)
    assert result.returncode != 0
    assert "vs float: mean KL divergence" in result.stdout and "(required <= 0)" in result.stdout


def test_sensitivity_report(project, weights):
    project.write_recipe("plain", RECIPE.format(doc="plain", extra=VARIANTS["plain"]))
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["plain"]))
    result = project.doit("sensitivity:tiny-llama-plain")
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    variants = {line.split("|")[1].strip(): line for line in table[1:]}
    for expected in ("recipe as written", "embeddings in float", "output head in float", "attention in float",
                     "MLP in float", "MLP in 8 bits", "first block in float", "last block in 8 bits"):
        assert expected in variants, f"{expected} missing from:\n{result.stdout}"
    mib = {label: float(line.split("|")[2]) for label, line in variants.items()}
    assert mib["MLP in float"] > mib["MLP in 8 bits"] > mib["recipe as written"]
    kls = {line.split("|")[5].strip() for line in variants.values()}
    assert len(kls) > 3, "variants did not change the quantized model"
