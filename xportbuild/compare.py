"""The published targets of a model side by side: a markdown table and a picture of size against agreement with
the float model (colour: decode speed). Reads artifacts/ only (no torch)."""

from __future__ import annotations

from pathlib import Path

from xportbuild.publish import read_published
from xportbuild.report import with_interval

COMPARE_DIR = "compare"  # under artifacts/: a target's name always holds a "-", this never does


def published_rows(artifacts_dir: Path, targets: dict[str, tuple[str, str]]) -> dict[str, list[dict]]:
    """{model: one row per published target of it}; `targets` maps a target to its (model, recipe)."""
    rows: dict[str, list[dict]] = {}
    for target, (model, recipe) in sorted(targets.items()):
        published = read_published(artifacts_dir / target)
        if published is None:
            continue
        against, runner = published.against_float, published.runner
        interval = against.get("top1_interval") or [against.get("top1", float("nan"))] * 2
        rows.setdefault(model, []).append({
            "recipe": recipe, "megabytes": published.size / 1e6,
            "top1": against.get("top1", float("nan")), "top1_low": interval[0], "top1_high": interval[1],
            "top1_text": with_interval(against, "top1", ".3f"), "kl": against.get("kl_mean", float("nan")),
            "decode": runner.get("decode_tokens_per_s"), "prefill": runner.get("prefill_tokens_per_s"),
            "lower_seconds": published.lower_seconds})
    return rows


def _rate(value) -> str:
    return f"{value:.1f}" if value else "-"


def write_comparison(model: str, rows: list[dict], folder: Path) -> tuple[Path, Path]:
    """<folder>/<model>.md and .png."""
    from xportbuild.plots import size_against_agreement

    folder.mkdir(parents=True, exist_ok=True)
    picture = size_against_agreement(rows, f"{model}: size against agreement with the float model",
                                     folder / f"{model}.png")
    table = ["| recipe | MB (.pte + .ptd) | top-1 vs float [95%] | mean KL | decode tok/s | prefill tok/s | lowering s |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {row['recipe']} | {row['megabytes']:.1f} | {row['top1_text']} | {row['kl']:.4f} | "
              f"{_rate(row['decode'])} | {_rate(row['prefill'])} | {_rate(row['lower_seconds'])} |"
              for row in sorted(rows, key=lambda r: r["megabytes"])]
    summary = folder / f"{model}.md"
    summary.write_text("\n".join([f"# {model}: published targets", "", *table, "",
                                  f"![size against agreement]({picture.name})", ""]))
    return summary, picture


def compare_project(recipes_dir: Path, models: list[str] | None = None) -> list[Path]:
    """Write a comparison for each model (or the ones named) that has a published target; the files written."""
    from xportbuild.build import Workspace
    from xportbuild.recipe import load_project

    targets = {t.name: (t.model.name, t.recipe.name) for t in load_project(recipes_dir)
               if not models or t.model.name in models}
    artifacts = Workspace.for_project(recipes_dir).artifacts_dir
    written = []
    for model, rows in published_rows(artifacts, targets).items():
        written.extend(write_comparison(model, rows, artifacts / COMPARE_DIR))
    return written
