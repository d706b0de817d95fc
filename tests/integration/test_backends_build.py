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


def test_openvino_runs_a_decoder_one_token_per_call_as_the_cpp_runner_does(project, weights):
    from xportbuild.stages.program import load_programs

    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["openvino-fp32"]))
    project.doit("export:tiny-llama-openvino-fp32")
    manifest = _manifest(project, "tiny-llama-openvino-fp32")
    program = manifest["stages"]["program"]["result"]
    assert program["runner_metadata"]["enable_dynamic_shape"] is False
    exported = load_programs(project.entry("program:tiny-llama.one-token").path)["forward"]
    shapes = [tuple(node.meta["val"].shape) for node in exported.graph.nodes
              if node.op == "placeholder" and node.name in exported.graph_signature.user_inputs]
    assert shapes == [(1, 1), (1,)] and all(isinstance(size, int) for shape in shapes for size in shape)
    lower = manifest["stages"]["lower"]["result"]
    assert lower["delegates"] == ["OpenvinoBackend"]
    assert lower["delegation"]["forward"]["delegate_calls"] == 1
    verify = manifest["stages"]["verify"]["result"]
    # the prompts' whole sequences went through one token per call, and ExecuTorch's C++ runner generated with it
    assert verify["vs_reference"]["positions"] > len(verify["greedy"]) and verify["vs_reference"]["top1"] == 1.0
    assert verify["runner"]["matches_pte_greedy"] is True and verify["runner"]["expected"].strip()


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
    assert f"verify:{target}" not in project.built_since(0)
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


def test_core_ml_holds_one_delegate_per_method_and_falls_back_to_xnnpack(project, run_folder, weights):
    from executorch.exir._serialize._program import deserialize_pte_binary

    project.write_model("tiny-vit", _vit_toml(_vit(run_folder), ["coreml-fp16", "coreml-fp32-xnnpack"]))
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["coreml-fp16"]))
    targets = ("tiny-vit-coreml-fp16", "tiny-vit-coreml-fp32-xnnpack", "tiny-llama-coreml-fp16")
    project.doit(*(f"lower:{target}" for target in targets))
    for target in targets:
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


def test_a_program_that_overflows_its_dtype_stops_before_lowering(project, weights, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "loud-llama"
    shutil.copytree(weights / "tiny-llama", folder)
    tensors = load_file(folder / "model.safetensors")
    tensors = {name: value * 1e7 if "embed_tokens" in name else value for name, value in tensors.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})  # past float16's 65504
    project.write_model("loud-llama", model_toml(local(folder), ["xnnpack-fp16"]))
    result = project.doit("export:loud-llama-xnnpack-fp16", check=False)
    assert result.returncode != 0
    assert "replay:loud-llama-xnnpack-fp16: the exported program's output holds NaN or infinite values" in \
        result.stdout + result.stderr
    assert not any(event["task"] == "lower:loud-llama-xnnpack-fp16" for event in project.events())
