"""plan: shared stages appear once; each stage's params hold only what it reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from xportbuild.keys import hash_file
from xportbuild.plan import plan_targets
from xportbuild.recipe import load_project

REPO = Path(__file__).resolve().parents[2]


def _plan():
    return plan_targets(load_project(REPO / "recipes"))


def test_model_stages_are_shared_between_recipes():
    plan = _plan()
    assert [n for n in plan.nodes if n.startswith(("fetch:gemma3", "reference:gemma3"))] == ["fetch:gemma3",
                                                                                                "reference:gemma3"]
    assert plan.targets["gemma3-xnnpack-fp32"].program == plan.targets["gemma3-portable-fp32"].program == "program:gemma3"
    assert plan.targets["gemma3-xnnpack-8da8w-shared"].program == "quantize:gemma3-xnnpack-8da8w-shared"


def test_ancestors_lists_dependencies_first():
    order = _plan().ancestors("verify:gemma3-xnnpack-8da8w-shared")
    assert order.index("fetch:gemma3") < order.index("quantize:gemma3-xnnpack-8da8w-shared") < order.index(
        "lower:gemma3-xnnpack-8da8w-shared") < order.index("verify:gemma3-xnnpack-8da8w-shared")


def test_a_tolerance_change_touches_only_verify_params():
    targets = load_project(REPO / "recipes")
    before = plan_targets(targets)
    changed = [dataclasses.replace(t, tolerances=dataclasses.replace(t.tolerances, min_top1=0.1)) for t in targets]
    after = plan_targets(changed)
    differing = sorted(n for n in before.nodes if before.nodes[n].params != after.nodes[n].params)
    assert differing == [f"verify:{t.name}" for t in sorted(targets, key=lambda t: t.name)]


def test_a_lowering_change_touches_only_lower_params():
    targets = load_project(REPO / "recipes")
    before = plan_targets(targets)
    changed = [dataclasses.replace(t, recipe=dataclasses.replace(
        t.recipe, lower=dataclasses.replace(t.recipe.lower, per_op_mode=True))) for t in targets]
    after = plan_targets(changed)
    differing = {n.split(":")[0] for n in before.nodes if before.nodes[n].params != after.nodes[n].params}
    assert differing == {"lower"}


def test_multi_method_targets_get_one_program_node_per_method():
    plan = _plan()
    float_t5 = plan.targets["t5-small-xnnpack-fp32"].programs
    assert float_t5 == {"program.encoder": "program:t5-small.encoder", "program.text_decoder": "program:t5-small.text_decoder"}
    mixed = plan.targets["t5-small-xnnpack-8da4w-decoder"].programs
    assert mixed == {"program.encoder": "quantize:t5-small-xnnpack-8da4w-decoder.encoder",
                     "program.text_decoder": "quantize:t5-small-xnnpack-8da4w-decoder.text_decoder"}
    encoder, decoder = (plan.nodes[task].params["quantize"] for task in mixed.values())
    # [quantize.encoder] overrides the linears of the encoder only; the rest of [quantize] applies to both.
    assert (encoder["linear"], encoder["linear_group_size"]) == ("8da8w", 0)
    assert (decoder["linear"], decoder["linear_group_size"]) == ("8da4w", 32)
    assert encoder["embedding"] == decoder["embedding"] == "8w"
    assert set(plan.nodes["lower:t5-small-xnnpack-8da4w-decoder"].inputs) == set(mixed)


def test_one_methods_quantization_touches_only_that_method():
    targets = load_project(REPO / "recipes")
    before = plan_targets(targets)
    changed, expected = [], set()
    for target in targets:
        overrides = []
        for method, spec in target.recipe.method_quantize:
            if method == "text_decoder":
                spec = dataclasses.replace(spec, linear_group_size=64)
                expected.add(f"quantize:{target.name}.text_decoder")
            overrides.append((method, spec))
        changed.append(dataclasses.replace(target, recipe=dataclasses.replace(target.recipe,
                                                                              method_quantize=tuple(overrides))))
    after = plan_targets(changed)
    differing = {n for n in before.nodes if before.nodes[n].params != after.nodes[n].params}
    assert "quantize:t5-small-xnnpack-8da4w-decoder.text_decoder" in expected
    assert differing == expected


def test_a_calibrated_recipe_keys_its_text_by_content_and_the_layer_study_finds_it():
    plan = _plan()
    quantize, study = plan.nodes["quantize:gemma3-xnnpack-8da4w"], plan.nodes["sensitivity:gemma3-xnnpack-8da4w"]
    text = REPO / "recipes" / "recipes" / "calibration" / "english.txt"
    assert quantize.params["quantize"]["calibration"] == hash_file(text)
    assert quantize.locator == study.locator == {"calibration": str(text)}


def test_a_pass_is_keyed_with_the_app_modules_it_imports_and_only_from_the_app(tmp_path):
    """A helper the pass imports is part of what lower runs: editing it must rerun lower."""
    import pytest

    from xportbuild import passes
    from xportbuild.errors import RecipeError

    recipe = str(tmp_path / "recipes" / "recipes" / "r.toml")
    (tmp_path / "app_passes.py").write_text("from helpers import tidy\n\ndef run(program):\n    return tidy(program)\n")
    (tmp_path / "helpers.py").write_text("def tidy(program):\n    return program\n")
    (tmp_path / "unrelated.py").write_text("x = 1\n")

    def source():
        return passes.locate(("app_passes:run",), recipe)[0].keyed()["source"]

    first = source()
    (tmp_path / "unrelated.py").write_text("x = 2\n")
    assert source() == first
    (tmp_path / "helpers.py").write_text("def tidy(program):\n    return program  # edited\n")
    assert source() != first

    outside = tmp_path.parent / f"{tmp_path.name}-outside.py"
    outside.write_text("def run(program):\n    return program\n")
    (tmp_path / "linked.py").symlink_to(outside)
    for name in ("linked:run", f"{outside.with_suffix('')}:run"):
        with pytest.raises(RecipeError):
            passes.locate((name,), recipe)
