"""Backends a recipe can name: a literal registry from name to the module that holds everything about it.

A backend module defines (without importing torch or ExecuTorch at import time, so validate and `doit list` stay
light):
- `partitioners(per_op_mode) -> list`: what lowering delegates to it (empty: portable kernels run everything);
- `PER_OP_MODE`: whether it can partition op by op;
- `GROUP_SCALE_DTYPE`: the dtype it stores group-wise weight scales in (quantize rounds with it, so the program
  verified against computes what the delegate computes);
- `weight_problem(scheme, group_size) -> (knob, message) | None`: why a linear quantization scheme cannot run on it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# The ExecuTorch version the lowering shortcuts (shortcuts.py: retrace.py, decompose.py, patterns.py, fake_values.py,
# lazy_code.py, provenance.py, cia_ops.py) were checked against, byte for byte: on another version lowering runs unpatched.
CHECKED_EXECUTORCH = "1.4.1"

REGISTRY: dict[str, str] = {
    "xnnpack": "xportbuild.backends.xnnpack",
    "portable": "xportbuild.backends.portable",
}


def backend(name: str) -> ModuleType:
    """The module of backend `name`."""
    if name not in REGISTRY:
        raise KeyError(f"unknown backend {name!r}: use one of {', '.join(sorted(REGISTRY))}")
    return importlib.import_module(REGISTRY[name])


def partitioners(name: str, per_op_mode: bool) -> list:
    """The partitioner list for backend `name` (empty for the portable CPU kernels)."""
    return backend(name).partitioners(per_op_mode)


def executorch_is_checked() -> bool:
    from executorch.version import __version__

    return __version__.split("+")[0] == CHECKED_EXECUTORCH
