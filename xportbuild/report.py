"""Human-readable summary of a published target, rendered from its manifest."""

from __future__ import annotations

STAGE_ORDER = ("fetch", "reference", "program", "quantize", "lower", "verify")


def _stage_rows(stages: dict) -> list[str]:
    rows = ["| stage | key | seconds | peak RSS MB |", "|---|---|---|---|"]
    for stage in STAGE_ORDER:
        if stage in stages:
            s = stages[stage]
            rows.append(f"| {stage} | `{s['key'][:12]}` | {s['seconds']} | {s['peak_rss_mb']} |")
    return rows


def _verify_rows(numbers: dict) -> list[str]:
    rows = ["| compared with | mean cosine | min cosine | top-1 | max abs |", "|---|---|---|---|---|"]
    for label, key in (("float eager model", "vs_reference"), ("pre-lowering program", "vs_program")):
        n = numbers[key]
        rows.append(f"| {label} | {n['cosine_mean']:.6f} | {n['cosine_min']:.6f} | {n['top1']:.3f} | {n['max_abs']:.4g} |")
    return rows


def render_report(manifest: dict) -> str:
    stages = manifest["stages"]
    verify = stages["verify"]["result"]
    lower = stages["lower"]["result"]
    lines = [
        f"# {manifest['target']}",
        "",
        f"model `{manifest['model']}`, recipe `{manifest['recipe']}`, backend `{lower['backend']}`, "
        f".pte {lower['pte_bytes'] / 2**20:.1f} MiB",
        "",
        "## Verification",
        *_verify_rows(verify),
        "",
    ]
    rate = verify.get("generate_tokens_per_s")
    if rate:
        lines += [f"greedy generation with the .pte: {rate:.1f} tokens/s", ""]
    quantized = stages.get("quantize", {}).get("result", {}).get("quantized")
    if quantized:
        lines += ["## Quantization", *(f"- {part}: {q['scheme']} {q['layers']}" for part, q in quantized.items()), ""]
    lines += ["## Stages", *_stage_rows(stages), ""]
    lines += ["## Tools", *(f"- {name} {version}" for name, version in manifest["libraries"].items()), ""]
    return "\n".join(lines)
