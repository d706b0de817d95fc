"""Backends beyond XNNPACK, built on tiny models: OpenVINO lowered and verified here; Core ML lowered here, its verify
stopped with one line (this runtime has no Core ML) and taken up by a second machine from the shared cache without
rebuilding; a program computing in float16."""

from __future__ import annotations

import json

from tests.conftest import made_once
from tests import tiny
from tests.integration.models import local, model_toml


def _vit(run_folder):
    root = run_folder / "kind-weights"
    root.mkdir(exist_ok=True)
    return made_once(root / "vit", lambda folder: tiny.save_image_classifier(folder, "vit"))


def _vit_toml(folder, recipes: list[str]) -> str:
    quoted = ", ".join(f'"{recipe}"' for recipe in recipes)
    return (f'doc = "tiny vit"\ntask = "image-classification"\nrecipes = [{quoted}]\n\n[source]\n{local(folder)}\n\n'
            "[verify]\nsamples = 2\n")


def _manifest(project, target: str) -> dict:
    return json.loads((project.root / "artifacts" / target / "manifest.json").read_text())


def test_openvino_lowers_the_whole_graph_and_verifies_here(project, run_folder):
    project.write_model("tiny-vit", _vit_toml(_vit(run_folder), ["openvino-fp32"]))
    project.doit("export:tiny-vit-openvino-fp32")
    manifest = _manifest(project, "tiny-vit-openvino-fp32")
    lower = manifest["stages"]["lower"]["result"]
    assert lower["delegates"] == ["OpenvinoBackend"]
    assert lower["delegation"]["forward"] == {"delegate_calls": 1, "ops_outside_delegates": 0}
    verify = manifest["stages"]["verify"]["result"]
    # what OpenVINO's CPU plugin computed in (bf16 on an AVX512-BF16 CPU, f32 elsewhere) is recorded beside the numbers
    assert verify["machine"]["openvino_cpu_inference_precision"] in ("bf16", "f32", "f16")
    assert verify["vs_program"]["cosine_min"] > 0.999
    assert manifest["libraries"]["openvino"].startswith("2025.") and manifest["libraries"]["nncf"].startswith("3.2.")


def test_core_ml_lowers_here_stops_at_verify_and_a_machine_sharing_the_cache_builds_nothing_before_verify(
        project, run_folder, tmp_path):
    target = "tiny-vit-coreml-fp32"
    project.write_model("tiny-vit", _vit_toml(_vit(run_folder), ["coreml-fp32"]))
    first = project.doit(f"export:{target}", check=False)
    assert first.returncode != 0
    lines = [line for line in (first.stdout + first.stderr).splitlines() if line.startswith(f"verify:{target}: this")]
    assert len(lines) == 1, first.stdout + first.stderr
    lower_entry = project.entry(f"lower:{target}")
    assert "has no CoreMLBackend" in lines[0] and f"lower entry {lower_entry.path.name}" in lines[0]
    assert f"doit export:{target}" in lines[0] and "XPORTBUILD_REMOTE_CACHE" in lines[0]
    assert json.loads((lower_entry.path / "delegates.json").read_text()) == ["CoreMLBackend"]
    record = json.loads((project.root / ".xportbuild" / "events.jsonl").read_text().splitlines()[-1])
    assert record["task"] != f"verify:{target}" or record["event"] != "built"
    assert not (project.root / "artifacts" / target).exists()  # nothing unverified is published

    first_cache = project.env["XPORTBUILD_CACHE"]
    project.env["XPORTBUILD_CACHE"] = str(tmp_path / "second-machine")
    mark = len(project.events())
    project.env.update(XPORTBUILD_REMOTE_CACHE=first_cache, XPORTBUILD_REMOTE_TRUST="1")
    second = project.doit(f"export:{target}", check=False)
    assert project.built_since(mark) == []  # every stage before verify pulled, none rebuilt
    assert "pulled" in second.stderr + second.stdout
    assert any(line.startswith(f"verify:{target}: this machine's ExecuTorch runtime has no CoreMLBackend")
               for line in (second.stdout + second.stderr).splitlines())


def test_core_ml_holds_one_delegate_per_method_and_falls_back_to_xnnpack(project, run_folder):
    from executorch.exir._serialize._program import deserialize_pte_binary

    project.write_model("tiny-vit", _vit_toml(_vit(run_folder), ["coreml-fp16", "coreml-fp32-xnnpack"]))
    project.doit("lower:tiny-vit-coreml-fp16", "lower:tiny-vit-coreml-fp32-xnnpack")
    for target in ("tiny-vit-coreml-fp16", "tiny-vit-coreml-fp32-xnnpack"):
        program = deserialize_pte_binary((project.entry(f"lower:{target}").path / "model.pte").read_bytes()).program
        (plan,) = [plan for plan in program.execution_plan if plan.name == "forward"]
        assert [delegate.id for delegate in plan.delegates][:1] == ["CoreMLBackend"]
        assert sum(delegate.id == "CoreMLBackend" for delegate in plan.delegates) == 1


def test_a_float16_program_is_verified_against_the_float32_model(project, weights):
    import torch

    from xportbuild.stages.program import load_programs

    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["xnnpack-fp16"]))
    project.doit("export:tiny-llama-xnnpack-fp16")
    manifest = _manifest(project, "tiny-llama-xnnpack-fp16")
    assert manifest["stages"]["program"]["result"]["runner_metadata"]["get_dtype"] == "float16"
    program = load_programs(project.entry("program:tiny-llama.float16").path)["forward"]
    floats = {name: value.dtype for name, value in [*program.state_dict.items(), *program.constants.items()]
              if torch.is_tensor(value) and value.is_floating_point()}
    assert floats and set(floats.values()) == {torch.float16}, floats  # weights and caches alike
    verify = manifest["stages"]["verify"]["result"]
    assert verify["vs_reference"]["top1"] == 1.0
    assert verify["vs_reference"]["max_abs"] > 1e-5  # compared with the float32 model, not with itself
