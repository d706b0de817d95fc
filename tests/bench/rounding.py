"""Benchmark: how a quantized target's rounding moves its eager quality against float, without lowering.

    python tests/bench/rounding.py gemma3-xnnpack-8da4w [--project DIR] [--cache DIR] [--damping 0.001 0.01 0.1 0.3]

For a target of a project (default: this repo) whose fetch and reference are built (cache: the project's
.xportbuild/cache), quantizes the float model
as the target's recipe says, once rounding to nearest and once with GPTQ at each damping (input moments measured
once on the recipe's calibration text), and prints for each the quantized eager model's agreement with float on
the model's verification prompts (held out: they are not in the calibration text) and the rounding time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _inputs(project: Path, target: str, cache: Path):
    """(fetch folder, reference folder, quantization with its calibration path, what the method exports, the
    delegate's group scale type)."""
    from xportbuild.build import Resolver, Workspace
    from xportbuild.plan import plan_targets
    from xportbuild.recipe import load_project
    from xportbuild.stages.program import method_export
    from xportbuild.stages.quantize import quant_spec

    plan = plan_targets(load_project(project / "recipes"))
    node = plan.nodes[plan.targets[target].program]
    if node.stage != "quantize":
        sys.exit(f"{target} quantizes nothing")
    resolver = Resolver(plan, Workspace(cache, project / "artifacts", project / ".xportbuild"))
    entries = {name: resolver.entry(task) for name, task in node.inputs.items()}
    if any(entry is None for entry in entries.values()):
        sys.exit(f"build the target's fetch and reference first: doit {' '.join(node.inputs.values())}")
    return (entries["fetch"].path, entries["reference"].path, quant_spec(node), method_export(node),
            node.params["group_scale_dtype"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target")
    parser.add_argument("--project", type=Path, default=REPO)
    parser.add_argument("--cache", type=Path, help="default: the project's .xportbuild/cache")
    parser.add_argument("--damping", type=float, nargs="+", default=[0.001, 0.01, 0.1, 0.3])
    args = parser.parse_args()

    from xportbuild.models.methods import load_samples
    from xportbuild.stages.program import load_model
    from xportbuild.stages.quantize import (
        CalibrationText,
        Rounding,
        apply_plan,
        eager_quality,
        quantization_plan,
        rounding_for,
    )

    cache = args.cache or args.project / ".xportbuild" / "cache"
    fetch, reference, spec, part, scale_dtype = _inputs(args.project, args.target, cache)
    samples = load_samples(reference)
    float_model = load_model(fetch, part)
    plan = quantization_plan(float_model, spec)
    gptq = dataclasses.replace(spec, algorithm="gptq", qparams="affine")
    text = CalibrationText(fetch, Path(spec.calibration or REPO / "recipes/recipes/calibration/english.txt"),
                           part.max_seq_len)
    started = time.perf_counter()
    moments = rounding_for(float_model, gptq, plan, text).moments
    print(f"input moments on {text.text_file.name}: {time.perf_counter() - started:.0f} s")
    print("| rounding | top-1 [95% interval] | mean KL | mean cosine | rounding s |\n|---|---|---|---|---|")
    roundings = {"nearest": Rounding("affine"), **{f"gptq, damping {d:g}": Rounding("affine", moments, d)
                                                  for d in args.damping}}
    for label, rounding in roundings.items():
        model = copy.deepcopy(float_model)
        started = time.perf_counter()
        apply_plan(model, plan, scale_dtype, rounding)
        seconds = time.perf_counter() - started
        n = eager_quality(model, part, samples)[part.method]
        low, high = n["top1_interval"]
        print(f"| {label} | {n['top1']:.3f} [{low:.3f}, {high:.3f}] | {n['kl_mean']:.4f} | {n['cosine_mean']:.4f} | "
              f"{seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
