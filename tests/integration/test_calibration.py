"""The rounding algorithm is a recipe knob that takes effect: GPTQ changes the program and the quantize key, the
calibration text is part of that key by content, and a lowering change does not recalibrate."""

from __future__ import annotations


from tests.integration.models import local, model_toml

RECIPE = '''doc = "{doc}"
backend = "xnnpack"
[quantize]
linear = "8da4w"
linear_group_size = 32
head = "8da8w"
head_group_size = 0
embedding = "8w"
{algorithm}
[lower]
extract_delegate_segments = true
[verify]
min_cosine = 0.8
min_top1 = 0.5
max_abs = 100.0
max_kl = 10.0
min_cosine_vs_program = 0.9
max_abs_vs_program = 8.0
greedy_tie_margin = 0.5
'''
GPTQ = 'algorithm = "gptq"\ncalibration = "calibration/english.txt"'


def test_gptq_changes_the_program_and_its_text_is_keyed_by_content(project, weights, tmp_path):
    project.env["XPORTBUILD_CACHE"] = str(tmp_path / "cache")  # counts the stages this test builds
    project.write_recipe("nearest-8da4w", RECIPE.format(doc="round to nearest", algorithm=""))
    project.write_recipe("gptq-8da4w", RECIPE.format(doc="GPTQ", algorithm=GPTQ))
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["nearest-8da4w", "gptq-8da4w"]))
    nearest, gptq = "tiny-llama-nearest-8da4w", "tiny-llama-gptq-8da4w"
    project.doit(f"quantize:{nearest}", f"export:{gptq}")

    entries = {target: project.entry(f"quantize:{target}") for target in (nearest, gptq)}
    assert entries[gptq].result["quantized"]["rounding"]["layers"] > 0
    assert "rounding" not in entries[nearest].result["quantized"]
    assert entries[gptq].record["key"] != entries[nearest].record["key"]
    programs = [project.entry(f"quantize:{target}").path / "forward.pt2" for target in (nearest, gptq)]
    assert programs[0].read_bytes() != programs[1].read_bytes()

    # A lowering change reuses the calibrated program.
    project.edit_recipe("gptq-8da4w", "extract_delegate_segments = true", "extract_delegate_segments = false")
    mark = len(project.events())
    project.doit(f"export:{gptq}")
    assert project.built_since(mark) == [f"lower:{gptq}", f"verify:{gptq}"]

    # The text is keyed by content: another text reruns quantize, the same text under another name does not.
    text = project.root / "recipes" / "recipes" / "calibration" / "english.txt"
    text.write_text(text.read_text().replace("lighthouse", "windmill"))
    info = project.doit("info", f"quantize:{gptq}", check=False)
    assert f"quantize:{gptq} is stale: params.quantize.calibration " in info.stdout, info.stdout
    mark = len(project.events())
    project.doit(f"export:{gptq}")
    assert f"quantize:{gptq}" in project.built_since(mark)
    text.with_name("renamed.txt").write_text(text.read_text())  # a copy: the shipped recipes read the original
    project.edit_recipe("gptq-8da4w", "calibration/english.txt", "calibration/renamed.txt")
    mark = len(project.events())
    project.doit(f"export:{gptq}")
    assert project.built_since(mark) == []


def test_damping_takes_effect(project, weights):
    for damping in (0.01, 0.5):
        project.write_recipe(f"gptq-8da4w-d{damping}".replace(".", ""),
                             RECIPE.format(doc="GPTQ", algorithm=f"{GPTQ}\ndamping = {damping}"))
    names = ["gptq-8da4w-d001", "gptq-8da4w-d05"]
    project.write_model("tiny-gemma3", model_toml(local(weights / "tiny-gemma3"), names))
    project.doit(*[f"quantize:tiny-gemma3-{name}" for name in names])
    programs = [(project.entry(f"quantize:tiny-gemma3-{name}").path / "forward.pt2").read_bytes() for name in names]
    assert programs[0] != programs[1]
