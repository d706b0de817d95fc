"""Backends a recipe can name: a literal registry from name to the module that builds its partitioners."""

from __future__ import annotations

import importlib

# The ExecuTorch version the lowering shortcuts (shortcuts.py: retrace.py, decompose.py, patterns.py, fake_values.py,
# lazy_code.py, provenance.py, cia_ops.py) were checked against, byte for byte: on another version lowering runs unpatched.
CHECKED_EXECUTORCH = "1.4.1"

REGISTRY: dict[str, str] = {
    "xnnpack": "xportbuild.backends.xnnpack:partitioners",
    "portable": "xportbuild.backends.portable:partitioners",
}


def partitioners(backend: str, per_op_mode: bool) -> list:
    """The partitioner list for `backend` (empty for the portable CPU kernels)."""
    if backend not in REGISTRY:
        raise KeyError(f"unknown backend {backend!r}: use one of {', '.join(sorted(REGISTRY))}")
    module_name, _, attr = REGISTRY[backend].partition(":")
    return getattr(importlib.import_module(module_name), attr)(per_op_mode)


def executorch_is_checked() -> bool:
    from executorch.version import __version__

    return __version__.split("+")[0] == CHECKED_EXECUTORCH
