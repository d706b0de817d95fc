"""Human-readable summary of a published target, rendered from its manifest."""

from __future__ import annotations

from xportbuild.pipeline import STAGES
from xportbuild.runtime import describe_machine

STAGE_ORDER = tuple(stage.name for stage in STAGES)
QUALITY_PLOT = "quality.png"  # beside report.md: KL from float along the sequence, per stage


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def stage_facts(stage: str, record: dict) -> str:
    """The key facts of a built stage, for its one line on the terminal."""
    facts = [human_bytes(sum(file["size"] for file in record["files"].values()))]
    result = record.get("result") or {}
    if stage == "reference":
        facts.append(f"{result.get('samples')} samples, {result.get('positions')} positions")
    elif stage == "verify" and isinstance(result.get("vs_reference"), dict):
        against = result["vs_reference"]
        if "top1" in against:
            facts.append(f"vs float: top-1 {with_interval(against, 'top1', '.3f')}, "
                         f"mean KL {with_interval(against, 'kl_mean', '.4f')}")
        else:  # outputs that are not scores (embeddings)
            facts.append(f"vs float: min cosine {against['cosine_min']:.4f}")
        if neighbours := result.get("neighbours"):
            facts.append(f"nearest neighbours as float {neighbours['agreement']:.3f}")
    return ", ".join(facts)


def _stage_rows(stages: dict) -> list[str]:
    """In pipeline order; a per-method stage (quantize.encoder) sits with its stage."""
    rows = ["| stage | key | seconds | peak RSS MB |", "|---|---|---|---|"]
    for name in sorted(stages, key=lambda name: (STAGE_ORDER.index(name.split(".")[0]), name)):
        s = stages[name]
        rows.append(f"| {name} | `{s['key'][:12]}` | {s['seconds']} | {s['peak_rss_mb']} |")
    return rows


def with_interval(numbers: dict, name: str, digits: str) -> str:
    """The number, with its 95% interval where it has one: `0.931 [0.912, 0.947]`."""
    if name not in numbers:
        return "-"
    interval = numbers.get(f"{name}_interval")
    bounds = f" [{format(interval[0], digits)}, {format(interval[1], digits)}]" if interval else ""
    return format(numbers[name], digits) + bounds


def _departures(numbers: dict) -> str:
    if "greedy_departs_at" not in numbers:
        return "not run"
    return ", ".join("-" if at is None else str(at) for at in numbers["greedy_departs_at"])


def _method_rows(methods: dict) -> list[str]:
    """Per method: the .pte replayed on the float model's recorded calls, against float and against the program."""
    rows = ["| method | vs | mean cosine | min cosine | top-1 | max abs | mean KL |", "|---|---|---|---|---|---|---|"]
    for method, compared in methods.items():
        for label, key in (("float", "vs_reference"), ("program", "vs_program")):
            n = compared[key]
            rows.append(f"| {method} | {label} | {n['cosine_mean']:.6f} | {n['cosine_min']:.6f} | "
                        f"{with_interval(n, 'top1', '.3f')} | {n['max_abs']:.4g} | {with_interval(n, 'kl_mean', '.4g')} |")
    return rows


def _verify_rows(numbers: dict) -> list[str]:
    """The .pte against float and program, pooled over what an app's choices come from, then method by method."""
    rows = ["| .pte compared with | positions | mean cosine | min cosine | top-1 | max abs | mean KL |",
            "|---|---|---|---|---|---|---|"]
    for label, key in (("float eager model", "vs_reference"), ("pre-lowering program", "vs_program")):
        n = numbers[key]
        rows.append(f"| {label} | {n.get('positions', '-')} | {n['cosine_mean']:.6f} | {n['cosine_min']:.6f} | "
                    f"{with_interval(n, 'top1', '.3f')} | {n['max_abs']:.4g} | {with_interval(n, 'kl_mean', '.4g')} |")
    return [*rows, "", *_method_rows(numbers["methods"])]


def quality_rows(by_stage: dict) -> list[str]:
    """One row per stage (quantized eager -> exported program -> .pte), each against the float model."""
    rows = ["| stage vs float | top-1 [95% interval] | mean cosine | mean KL [95% interval] | greedy departs at "
            "(per prompt) |", "|---|---|---|---|---|"]
    order = ("quantized eager", "program", ".pte")
    for stage in sorted(by_stage, key=lambda name: order.index(name) if name in order else len(order)):
        n = by_stage[stage]
        rows.append(f"| {stage} | {with_interval(n, 'top1', '.3f')} | {n['cosine_mean']:.4f} | {with_interval(n, 'kl_mean', '.4f')} "
                    f"| {_departures(n)} |")
    return rows


def _sizes(lower: dict) -> str:
    if "ptd_bytes" not in lower:
        return f".pte {lower['pte_bytes'] / 2**20:.1f} MiB"
    return (f".pte {lower['pte_bytes'] / 2**20:.1f} MiB + .ptd {lower['ptd_bytes'] / 2**20:.1f} MiB (external weights; "
            f"the tied embedding/head table is stored once) = {lower['artifact_bytes'] / 2**20:.1f} MiB")


def _tied_rows(tied: dict | None) -> list[str]:
    if not tied:
        return []
    if not tied["tied_in_float"]:
        return ["- tied table: not shared, the model's head and embedding are separate tables"]
    if tied.get("shared_table"):
        return [f"- tied embedding/head table {tied['shared_table']}: stored once, in model.ptd"]
    return [f"- tied embedding/head table: stored {tied['quantized_copies']} times in the .pte"]


def _runner_rows(runner: dict) -> list[str]:
    from xportbuild.llm_runner import RunFigures

    if "error" in runner:
        return ["## ExecuTorch LLM runner", f"The runner could not run this artifact: {runner['error']}", ""]
    figures = RunFigures(**{name: runner[name] for name in RunFigures.__dataclass_fields__})
    return ["## ExecuTorch LLM runner", "What an app sees (prompt 0, greedy; `python -m xportbuild run` prints the same):",
            "", f"- {figures.summary()}", f"- text: {runner['text']!r} (equals the .pte's greedy text: "
            f"{'yes' if runner['matches_pte_greedy'] else 'NO'})", ""]


def _computed_by(stages: dict) -> str:
    """Which runtimes run the .pte, and the dtype its program computes in (what `get_dtype` reports)."""
    delegates = stages["lower"]["result"].get("delegates", [])
    runners = [stage["result"].get("runner_metadata", {}) for name, stage in stages.items()
               if name.split(".")[0] in ("program", "quantize")]
    dtypes = sorted({runner["get_dtype"] for runner in runners if "get_dtype" in runner})
    return (f"Delegates: {', '.join(delegates) or 'none (portable kernels)'}"
            + (f"; the program computes in {', '.join(dtypes)}" if dtypes else "") + ".")


def render_report(manifest: dict) -> str:
    stages = manifest["stages"]
    verify = stages["verify"]["result"]
    lower = stages["lower"]["result"]
    lines = [
        f"# {manifest['target']}",
        "",
        f"model `{manifest['model']}`, recipe `{manifest['recipe']}`, backend `{lower['backend']}`, "
        f"{_sizes(lower)}",
        "",
        _computed_by(stages),
        "",
        "## Quality by stage",
        "Each method on the float model's recorded calls (a decoder teacher-forced on the float model's greedy text: "
        "every position of every verification sample); intervals are 95% bootstrap intervals over samples. Greedy "
        "departs at: where the .pte's own outcome first leaves the float model's (\"-\": equal).",
        "",
        *quality_rows(verify["quality_by_stage"]),
        "",
        *([f"![KL from the float model along the sequence]({QUALITY_PLOT})", ""] if has_kl(verify) else []),
        "## Verification",
        *_verify_rows(verify),
        "",
    ]
    if verify.get("machine"):
        lines += [f"Measured on {describe_machine(verify['machine'])}.", ""]
    if neighbours := verify.get("neighbours"):
        lines += [f"nearest neighbour of each of {neighbours['samples']} samples (cosine, among the others) equals the "
                  f"float model's: {neighbours['agreement']:.3f}", ""]
    rate = verify.get("generate_tokens_per_s")
    if rate:
        lines += [f"greedy generation with the .pte (Python bindings, one call per token): {rate:.1f} tokens/s", ""]
    if verify.get("runner"):
        lines += _runner_rows(verify["runner"])
    for name in sorted(stage for stage in stages if stage.split(".")[0] == "quantize"):
        quantized = stages[name].get("result", {}).get("quantized")
        if quantized:
            method = name.partition(".")[2]
            parts = {part: q for part, q in quantized.items() if "scheme" in q}
            lines += [f"## Quantization{f' of {method}' if method else ''}",
                      *(f"- {part}: {q['scheme']} {q['layers']}" for part, q in parts.items())]
            lines += _tied_rows(quantized.get("tied_embedding"))
            if rounding := quantized.get("rounding"):
                lines.append(f"- rounding: {rounding['algorithm']} on the recipe's calibration text, "
                             f"{rounding['layers']} layers, damping {rounding['damping']:g}; the rest to nearest")
            lines.append("")
    lines += ["## Stages", *_stage_rows(stages), ""]
    lines += ["## Tools", *(f"- {name} {version}" for name, version in manifest["libraries"].items()), ""]
    return "\n".join(lines)


def sensitivity_rows(variants: dict) -> list[str]:
    """The sensitivity table: one row per variant of the recipe's quantization, measured eagerly."""
    rows = ["| variant | weights MiB | top-1 [95% interval] | mean cosine | mean KL |", "|---|---|---|---|---|"]
    for label, n in variants.items():
        rows.append(f"| {label} | {n['weight_bytes'] / 2**20:.3f} | {with_interval(n, 'top1', '.3f')} | "
                    f"{n['cosine_mean']:.4f} | {with_interval(n, 'kl_mean', '.4f')} |")
    return rows


def has_kl(verify: dict) -> bool:
    """Whether verify measured KL along the sequence (outputs that are scores), which the quality plot shows."""
    return any(any(len(row) for row in rows) for rows in (verify.get("kl_by_position") or {}).values())
