"""Reuse a retrace's fake value for an op applied again to the very same input values.

Every ExecuTorch pass built on ExportPass ends by retracing its whole graph: each node's op runs again on fake
tensors to refresh the node's metadata. Lowering a decoder runs about a dozen such whole-graph retraces (the edge
conversion, then to_executorch) and a few per XNNPACK partition, and most of them rewrite few nodes or none. A fake
op is a function of its op, its input values and its other arguments: when a retrace calls an op on the same input
objects (identity) with equal other arguments as an earlier retrace of this lowering, its output is the one that
earlier call returned, so that one is reused instead of computed again (fake-tensor propagation with symbolic shapes
is most of what a retrace costs). Inputs the pass rewrote are new objects, so everything downstream of a rewrite is
computed as before.

Only ops that do not mutate their inputs are reused. Two equal calls within one retrace (a graph may hold duplicate
nodes) get distinct outputs, as they would without reuse: the n-th equal call of a retrace gets the n-th value
recorded for that call, or a new one. A value belongs to its fake mode (one per method), so the mode is part of the
call. An edge op is the same call as the ATen op it wraps, and a one-element real tensor (ScalarToTensorPass makes
a new one per scalar argument on every retrace) is compared by value.

Tied to the ExecuTorch version it was checked against (`backends.CHECKED_EXECUTORCH`);
tests/integration/test_lower_retrace.py lowers with and without it and compares the .pte bytes.
"""

from __future__ import annotations

import weakref
from collections import Counter
from contextlib import contextmanager

from xportbuild.backends import executorch_is_checked

_SCALARS = (bool, int, float, str, type(None))
_PURE_MODULES = {"_operator", "math"}  # the modules of the Python arithmetic ExportPass traces on symbolic sizes
# Higher-order ops that return new values and leave their inputs alone: a functionalized in-place op (the KV cache
# update) and a call into a lowered delegate (its fake run executes the delegate's original graph).
_FUNCTIONAL_HIGHER_ORDER_OPS = {"auto_functionalized", "auto_functionalized_v2", "executorch_call_delegate"}


def _reusable(target) -> bool:
    """An op that does not mutate its inputs, or arithmetic on symbolic sizes (what ExportPass traces as call_sym)."""
    import torch
    from executorch.exir.pass_base import _TORCH_SYM_OPS

    op = _aten_op(target)
    if isinstance(op, torch._ops.OpOverload):
        return not op._schema.is_mutable
    return (getattr(target, "__module__", None) in _PURE_MODULES or target in _TORCH_SYM_OPS
            or getattr(target, "__name__", None) in _FUNCTIONAL_HIGHER_ORDER_OPS)


def _call_key(target, args, kwargs):
    """A hashable key of the call, with tensors and symbolic values by identity; None if an argument has no key.
    Returns (key, the objects identified), so that the caller keeps them alive while the key is in use.

    A list and a tuple of the same items are the same argument to an op (passes rebuild args as either)."""
    held: list = []

    def part(value):
        if isinstance(value, (list, tuple)):
            items = tuple(part(item) for item in value)
            return None if None in items else ("seq", items)
        if isinstance(value, dict):
            items = tuple((name, part(item)) for name, item in sorted(value.items()))
            return None if any(item is None for _, item in items) else ("map", items)
        if _is_scalar_constant(value):
            return ("constant", value.dtype, tuple(value.shape), _item(value))
        if isinstance(value, _by_identity_types()):
            held.append(value)
            return ("id", id(value))
        if isinstance(value, _by_value_types()):
            return (type(value), value)
        return None

    key = part((args, kwargs))
    return (None if key is None else (_aten_op(target), key)), held


def _aten_op(target):
    """An edge dialect op runs its ATen op on fake tensors: both are the same call."""
    from executorch.exir.dialects.edge._ops import EdgeOpOverload

    return target._op if isinstance(target, EdgeOpOverload) else target


def _is_scalar_constant(value) -> bool:
    """A real one-element tensor (ScalarToTensorPass makes a new one for each scalar argument on every retrace)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor) and value.numel() == 1 \
        and value.device.type == "cpu" and not value.requires_grad


def _item(tensor):
    """The tensor's value, read outside the fake mode a retrace runs in."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return tensor.item()


def _by_identity_types() -> tuple:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    return torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool, torch.nn.Module, FakeTensorMode


def _by_value_types() -> tuple:
    import torch

    return _SCALARS + (torch.dtype, torch.device, torch.layout, torch.memory_format, torch._ops.OpOverload)


@contextmanager
def reuse_fake_values():
    """Within the block, ExportPass retraces reuse fake values (see module doc); yields counts reused/computed."""
    import executorch.exir.pass_base as pass_base

    counts = Counter(reused=0, computed=0)
    if not executorch_is_checked():
        yield counts
        return
    recorded: dict = {}  # key -> (inputs held alive, [outputs in call order])
    taken_by_retrace: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tracer -> Counter of keys taken
    original_fx = pass_base._ExportPassBase._fx

    def fx(self, kind, target, args, kwargs, meta):
        if kind != "call_function" or not _reusable(target):
            return original_fx(self, kind, target, args, kwargs, meta)
        args_data, kwargs_data = _data(args, kwargs)
        # Values made under one fake mode belong to it: a lowering with several methods has one mode per method.
        key, held = _call_key(target, (self.fake_tensor_mode, args_data), kwargs_data)
        if key is None:
            return original_fx(self, kind, target, args, kwargs, meta)
        taken = taken_by_retrace.setdefault(self.tracer, Counter())
        index = taken[key]
        taken[key] += 1
        outputs = recorded.setdefault(key, (held, []))[1]
        if index < len(outputs):
            counts["reused"] += 1
            self.interpreter.call_function = lambda *_: outputs[index]
            try:
                return original_fx(self, kind, target, args, kwargs, meta)
            finally:
                del self.interpreter.call_function
        counts["computed"] += 1
        result = original_fx(self, kind, target, args, kwargs, meta)
        outputs.append(result.data)
        return result

    pass_base._ExportPassBase._fx = fx
    try:
        yield counts
    finally:
        pass_base._ExportPassBase._fx = original_fx


def _data(args, kwargs):
    from executorch.exir.pass_base import ProxyValue
    from torch.utils import _pytree as pytree

    return pytree.tree_map_only(ProxyValue, lambda value: value.data, (args, kwargs))
