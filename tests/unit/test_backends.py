"""A backend is one module holding what the recipe checks, the plan and lowering ask of it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xportbuild import backends


@pytest.mark.parametrize("name", sorted(backends.REGISTRY))
def test_a_backend_module_answers_what_recipes_plans_and_lowering_ask(name):
    assert isinstance(backends.per_op_mode(name), bool)
    assert backends.group_scale_dtype(name) in ("float32", "bfloat16", "float16")
    module = backends.backend(name)
    assert callable(getattr(module, "partitioners", None)) or backends.refusal(name, "image-classification")


def test_backend_modules_import_without_torch():
    names = ", ".join(repr(module) for module in backends.REGISTRY.values())
    code = f"import importlib, sys\nfor m in ({names},): importlib.import_module(m)\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_scheme_the_backend_has_no_kernel_for_is_named_by_it():
    assert backends.weight_problem("xnnpack", "8da4w", 48)[1].startswith("48: XNNPACK needs a multiple of 32")
    assert backends.weight_problem("xnnpack", "8da8w", 32)[0] == "_group_size"
    assert backends.weight_problem("xnnpack", "8da4w", 32) is None
    assert "no kernels for quantized linears" in backends.weight_problem("portable", "8da8w", 0)[1]


@pytest.mark.parametrize("name", sorted(backends.REGISTRY))
def test_every_backend_says_what_runs_it_and_what_it_needs(name):
    module = backends.backend(name)
    assert module.DELEGATE is None or module.DELEGATE.endswith("Backend")
    assert module.RUNS_ON and set(backends.dtypes(name)) <= {"float32", "float16", "bfloat16"}
    assert all(isinstance(package, str) for package in backends.packages(name))
    assert backends.unavailable(name) is None or "pip install" in backends.unavailable(name)


def test_a_package_missing_or_of_another_series_is_named_with_its_install_command():
    assert backends.version_problem("no-such-package-xportbuild", "1.", "x") == \
        "no-such-package-xportbuild is not installed: pip install -e '.[x]'"
    problem = backends.version_problem("xxhash", "0.", "y")
    assert problem.startswith("xxhash ") and problem.endswith("it needs 0.x: pip install -e '.[y]'")
    assert backends.version_problem("no-such-package-xportbuild", "1.", "").endswith(": pip install -e .")


def test_fixed_shape_backends_take_images_and_decoders_one_token_per_call_and_refuse_other_sequences():
    for name in ("openvino", "coreml"):
        assert backends.fixed_shapes(name)
        assert "dynamic length" in backends.refusal(name, "masked-lm")
        assert "dynamic length" in backends.refusal(name, "text2text")
        assert backends.refusal(name, "image-classification") is None
        assert backends.refusal(name, "causal-lm") is None
    assert not backends.fixed_shapes("xnnpack")
    assert "Qualcomm" in backends.refusal("qnn", "image-classification") or "no QNN lowering" in \
        backends.refusal("qnn", "image-classification")
    assert "Vulkan" in backends.refusal("vulkan", "causal-lm")


def test_a_lower_node_keys_its_backends_packages_and_a_verify_node_its_runtimes():
    from xportbuild.pipeline import code_roots, node_libraries
    from xportbuild.plan import StageNode

    lower = StageNode("lower", "t", {"lower": {"backend": "coreml", "fallback": "xnnpack"}})
    assert "coremltools" in node_libraries(lower) and "torch" in node_libraries(lower)
    assert {"xportbuild.backends.coreml", "xportbuild.backends.xnnpack"} <= set(code_roots(lower))
    verify = StageNode("verify", "t", {"backends": ["openvino"], "task": "image-classification"})
    assert {"openvino", "nncf"} <= set(node_libraries(verify))
    assert "openvino" not in node_libraries(StageNode("lower", "t", {"lower": {"backend": "xnnpack"}}))
