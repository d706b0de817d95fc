"""Sensitivity stage (opt-in, slow): the recipe's quantization with one group of layers left in float or moved
to 8 bits, each measured eagerly against the float reference, so users can see which layers cost quality."""

from __future__ import annotations

import json
import re
from pathlib import Path

from xportbuild.recipe.spec import QuantSpec
from xportbuild.stages.program import MethodExport, load_model, method_export
from xportbuild.stages.quantize import (
    WEIGHT_BITS,
    Plan,
    apply_plan,
    calibration_text,
    eager_quality,
    quant_spec,
    quantization_plan,
    rounding_for,
)

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_groups(plan: Plan, module_names: list[str]) -> dict[str, set[str]]:
    """Named groups of planned modules: embeddings, output head, attention, MLP, first and last block."""
    blocks = {name: int(m.group(1)) for name in module_names if (m := _BLOCK.search(name))}
    last = max(blocks.values(), default=0)
    rules = {
        "embeddings": lambda name, part: part == "embedding",
        "output head": lambda name, part: part == "head",
        "attention": lambda name, part: part == "linear" and "attn" in name,
        "MLP": lambda name, part: part == "linear" and any(k in name for k in ("mlp", "feed_forward", "ffn")),
        "first block": lambda name, part: blocks.get(name) == 0,
        "last block": lambda name, part: blocks.get(name) == last,
    }
    groups = {label: {name for name, (part, _, _) in plan.items() if rule(name, part)} for label, rule in rules.items()}
    return {label: names for label, names in groups.items() if names}


def _eight_bit(part: str, scheme: str) -> tuple[str, int]:
    if part == "embedding" or not scheme.startswith("8da"):
        return "8w", 0
    return "8da8w", 0


def variants(plan: Plan, module_names: list[str]) -> dict[str, Plan]:
    """The recipe's plan, then per group: that group in float, and that group in 8 bits (if it is not already)."""
    result = {"recipe as written": plan}
    for label, names in layer_groups(plan, module_names).items():
        result[f"{label} in float"] = {n: v for n, v in plan.items() if n not in names}
        if any(WEIGHT_BITS[plan[n][1]] < 8 for n in names):
            result[f"{label} in 8 bits"] = {n: (v[0], *_eight_bit(v[0], v[1])) if n in names else v
                                            for n, v in plan.items()}
    return result


def weight_bytes(model, plan: Plan, scale_bytes: int) -> int:
    """Bytes of the model's weights under `plan` (before it is applied); a float tied table counts once."""
    float_weights, total = set(), 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not hasattr(weight, "numel"):
            continue
        if name in plan:
            _, scheme, group = plan[name]
            groups = weight.numel() // (group or weight.shape[-1])
            total += weight.numel() * WEIGHT_BITS[scheme] // 8 + groups * scale_bytes
        elif id(weight) not in float_weights:
            float_weights.add(id(weight))
            total += weight.numel() * weight.element_size()
    return total


def sensitivity(model_dir: Path, reference_dir: Path, part: MethodExport, spec: QuantSpec, group_scale_dtype: str,
                out_dir: Path) -> dict:
    from xportbuild.models.methods import load_samples
    from xportbuild.report import sensitivity_rows

    samples = load_samples(reference_dir)
    model = load_model(model_dir, part)
    names = [name for name, _ in model.named_modules()]
    base = quantization_plan(model, spec)
    rounding = rounding_for(model, spec, base, calibration_text(model_dir, spec, part))  # measured once, in float
    scale_bytes = 2 if group_scale_dtype == "bfloat16" else 4
    rows = {}
    for label, plan in variants(base, names).items():
        model = load_model(model_dir, part)
        size = weight_bytes(model, plan, scale_bytes)
        apply_plan(model, plan, group_scale_dtype, rounding)
        numbers = eager_quality(model, part, samples)[part.method]
        rows[label] = {**numbers, "weight_bytes": size, "quantized_modules": len(plan)}
    (out_dir / "sensitivity.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "sensitivity.md").write_text("\n".join(sensitivity_rows(rows)) + "\n")
    return {"variants": rows}


def run(node, inputs: dict[str, Path], out_dir: Path, workspace) -> dict:
    return sensitivity(inputs["fetch"], inputs["reference"], method_export(node), quant_spec(node),
                       node.params["group_scale_dtype"], out_dir)
