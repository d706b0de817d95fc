"""Quantize stage: torchao quantization of the eager model's linears and embeddings, then export per method.

Every knob must take effect: the stage reads back what it quantized and fails if anything differs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from xportbuild.errors import StageError
from xportbuild.recipe.spec import QuantSpec
from xportbuild.stages.program import export_program

_BITS = {"4w": 4, "8w": 8, "8da4w": 4, "8da8w": 8}


def _config(scheme: str, group_size: int, group_scale_dtype: str):
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    granularity = PerAxis(0) if group_size == 0 else PerGroup(group_size)
    weight_dtype = torch.int4 if _BITS[scheme] == 4 else torch.int8
    scale_dtype = getattr(torch, group_scale_dtype) if group_size else None
    if scheme.startswith("8da"):
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=weight_dtype, weight_granularity=granularity,
                                                     weight_scale_dtype=scale_dtype)
    return IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=granularity, scale_dtype=scale_dtype)


def _group_sizes(model, kind) -> dict[str, int]:
    """{module name: group size chosen} for quantizable modules of `kind` (per-axis = in_features)."""
    return {name: module.weight.shape[-1] for name, module in model.named_modules() if isinstance(module, kind)}


def _plan_groups(widths: dict[str, int], group_size: int, fallback: bool, what: str) -> dict[str, int]:
    if group_size == 0:
        return {name: 0 for name in widths}
    undivided = sorted(name for name, width in widths.items() if width % group_size)
    if undivided and len(undivided) == len(widths):
        raise StageError(f"quantize.{what}_group_size={group_size} divides no {what} layer (widths: "
                         f"{sorted(set(widths.values()))}); pick a divisor or 0 for per-channel")
    if undivided and not fallback:
        raise StageError(f"quantize.{what}_group_size={group_size} does not divide {undivided[:3]}...; "
                         "set per_axis_fallback = true or pick another group size")
    return {name: (0 if name in undivided else group_size) for name in widths}


def _apply(model, scheme: str, groups: dict[str, int], group_scale_dtype: str) -> None:
    from torchao.quantization import quantize_

    for group_size in sorted(set(groups.values())):
        names = {name for name, size in groups.items() if size == group_size}
        config = _config(scheme, group_size, group_scale_dtype)
        quantize_(model, config, filter_fn=lambda module, fqn, names=names: fqn in names)


def _read_back(model, groups: dict[str, int], what: str) -> dict:
    """Check each module's weight is quantized with the planned block size; count per group size."""
    modules = dict(model.named_modules())
    counts: Counter = Counter()
    for name, group_size in groups.items():
        weight = modules[name].weight
        block = getattr(weight, "block_size", None)
        expected = group_size or weight.shape[-1]
        if block is None or block[-1] != expected:
            raise StageError(f"quantize: {what} {name} was not quantized as planned "
                             f"(weight {type(weight).__name__}, block {block}, expected group {expected})")
        counts["per-channel" if group_size == 0 else f"group {group_size}"] += 1
    return dict(counts)


def quantize_model(model, spec: QuantSpec, group_scale_dtype: str = "float32") -> dict:
    """Quantize in place; returns {"linear": {...}, "embedding": {...}} counts read back from the weights."""
    import torch

    report = {}
    parts = (("embedding", torch.nn.Embedding, spec.embedding, spec.embedding_group_size),
             ("linear", torch.nn.Linear, spec.linear, spec.linear_group_size))
    for what, kind, scheme, group_size in parts:
        if scheme == "none":
            continue
        groups = _plan_groups(_group_sizes(model, kind), group_size, spec.per_axis_fallback, what)
        if not groups:
            raise StageError(f"quantize.{what} = {scheme!r} but the model has no {what} layers")
        _apply(model, scheme, groups, group_scale_dtype)
        report[what] = {"scheme": scheme, "layers": _read_back(model, groups, what)}
    return report


def run(node, inputs: dict[str, Path], out_dir: Path, workspace) -> dict:
    spec = QuantSpec(**node.params["quantize"])
    return export_program(inputs["fetch"], node.params["max_seq_len"], out_dir,
                          prepare=lambda model: {"quantized": quantize_model(model, spec, node.params["group_scale_dtype"])})
