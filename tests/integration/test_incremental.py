"""Incremental builds, observed: which stage functions ran after each kind of change."""

from __future__ import annotations

import json
import shutil

from tests.integration.models import local, model_toml

TARGET = "tiny-llama-xnnpack-8da8w-shared"


def test_only_stale_stages_rerun(project, weights, tmp_path):
    project.env["XPORTBUILD_CACHE"] = str(tmp_path / "private-cache")
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["xnnpack-8da8w-shared"]))

    project.doit(f"export:{TARGET}")
    assert project.built_since(0) == sorted(
        ["fetch:tiny-llama", "reference:tiny-llama", f"quantize:{TARGET}", f"replay:{TARGET}", f"lower:{TARGET}",
         f"verify:{TARGET}"])

    mark = len(project.events())
    result = project.doit(f"export:{TARGET}")
    assert project.built_since(mark) == []
    assert f"-- export:{TARGET}" in result.stdout

    project.edit_recipe("xnnpack-8da8w-shared", "extract_delegate_segments = true", "extract_delegate_segments = false")
    info = project.doit("info", f"lower:{TARGET}", check=False)
    # exactly the one real change: no list that merely reads back differently (`passes []→[]`)
    assert f"lower:{TARGET} is stale: params.lower.extract_delegate_segments true→false (args" in info.stdout, info.stdout
    info = project.doit("info", f"export:{TARGET}", check=False)
    assert f"lower:{TARGET} is stale: params.lower.extract_delegate_segments true→false" in info.stdout
    mark = len(project.events())
    project.doit(f"export:{TARGET}")
    assert project.built_since(mark) == [f"lower:{TARGET}", f"verify:{TARGET}"]

    project.edit_recipe("xnnpack-8da8w-shared", "max_abs_vs_program = 10.0", "max_abs_vs_program = 10.5")
    mark = len(project.events())
    project.doit(f"export:{TARGET}")
    assert project.built_since(mark) == [f"verify:{TARGET}"]

    project.edit_recipe("xnnpack-8da8w-shared", 'qparams = "affine"', 'qparams = "hqq"')
    mark = len(project.events())
    project.doit(f"export:{TARGET}")
    assert project.built_since(mark) == [f"lower:{TARGET}", f"quantize:{TARGET}", f"replay:{TARGET}", f"verify:{TARGET}"]
    manifest = json.loads((project.root / "artifacts" / TARGET / "manifest.json").read_text())
    assert manifest["stages"]["quantize"]["params"]["quantize"]["qparams"] == "hqq"


def test_restored_cache_without_doit_state_is_reused(project, weights, tmp_path):
    project.env["XPORTBUILD_CACHE"] = str(tmp_path / "ci-cache")
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["xnnpack-fp32"]))
    project.doit("export:tiny-llama-xnnpack-fp32")

    # A fresh clone in CI: no .xportbuild/ state, no artifacts, only the restored cache folder.
    shutil.rmtree(project.root / ".xportbuild")
    shutil.rmtree(project.root / "artifacts")
    project.doit("export:tiny-llama-xnnpack-fp32")
    assert project.built_since(0) == []
    assert (project.root / "artifacts" / "tiny-llama-xnnpack-fp32" / "model.pte").is_file()


def test_tampered_artifact_is_republished(project, weights):
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["xnnpack-fp32"]))
    project.doit("export:tiny-llama-xnnpack-fp32")
    pte = project.root / "artifacts" / "tiny-llama-xnnpack-fp32" / "model.pte"
    original = pte.read_bytes()
    pte.write_bytes(original[:-10])
    result = project.doit("export:tiny-llama-xnnpack-fp32")
    assert "export:tiny-llama-xnnpack-fp32: publishing" in result.stderr
    assert pte.read_bytes() == original


SWAP_PASS = """import torch


def {name}(program):
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.add.Tensor and {condition}:
            node.args = (node.args[1], node.args[0])
            break
    program.graph_module.recompile()
    return program
"""


def test_editing_a_named_pass_reruns_lower_and_verify(project, weights, tmp_path):
    project.env["XPORTBUILD_CACHE"] = str(tmp_path / "private-cache")
    pass_file = project.root / "my_passes.py"
    pass_file.write_text(SWAP_PASS.format(name="swap_add", condition="False"))
    project.write_recipe("xnnpack-mine", (project.root / "recipes/recipes/xnnpack-fp32.toml").read_text()
                         + '\n[lower]\npasses = ["my_passes:swap_add"]\n')
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["xnnpack-mine"]))
    project.doit("export:tiny-llama-xnnpack-mine")

    # The same pass name, new code: swapping a commutative add changes the graph, not the numbers.
    pass_file.write_text(SWAP_PASS.format(name="swap_add", condition="True"))
    info = project.doit("info", "lower:tiny-llama-xnnpack-mine", check=False)
    assert "params.passes" in info.stdout
    mark = len(project.events())
    project.doit("export:tiny-llama-xnnpack-mine")
    assert project.built_since(mark) == ["lower:tiny-llama-xnnpack-mine", "verify:tiny-llama-xnnpack-mine"]
