"""A backend is one module holding what the recipe checks, the plan and lowering ask of it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xportbuild import backends


@pytest.mark.parametrize("name", sorted(backends.REGISTRY))
def test_a_backend_module_answers_what_recipes_plans_and_lowering_ask(name):
    module = backends.backend(name)
    assert isinstance(module.PER_OP_MODE, bool)
    assert module.GROUP_SCALE_DTYPE in ("float32", "bfloat16", "float16")
    assert callable(module.partitioners) and callable(module.weight_problem)


def test_backend_modules_import_without_torch():
    names = ", ".join(repr(module) for module in backends.REGISTRY.values())
    code = f"import importlib, sys\nfor m in ({names},): importlib.import_module(m)\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_scheme_the_backend_has_no_kernel_for_is_named_by_it():
    assert backends.backend("xnnpack").weight_problem("8da4w", 48)[1].startswith("48: XNNPACK needs a multiple of 32")
    assert backends.backend("xnnpack").weight_problem("8da8w", 32)[0] == "_group_size"
    assert backends.backend("xnnpack").weight_problem("8da4w", 32) is None
    assert "no kernels for quantized linears" in backends.backend("portable").weight_problem("8da8w", 0)[1]
