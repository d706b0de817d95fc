"""Pictures of verification numbers (matplotlib, no torch): KL from the float model along the sequence for each
stage of one target, and size against agreement across the targets of a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# In pipeline order, each drawn over the one before; a stage equal to the one before shows as its dashes.
STAGE_STYLES = {"quantized eager": ("tab:orange", "-"), "program": ("tab:blue", "--"), ".pte": ("tab:green", ":")}
_FLOOR = 1e-7  # KL of exactly 0 (the same numbers) drawn at the bottom of the log scale


def _figure(width: float, height: float, panels: int = 1):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or opened
    from matplotlib import pyplot

    return pyplot, pyplot.subplots(1, panels, figsize=(width, height), dpi=100)


def kl_along_sequence(kl_by_position: dict[str, list[list[float]]], path: Path) -> Path:
    """Per stage, the mean KL over samples at each position (a sample's positions: its prompt, then what followed)."""
    pyplot, (figure, axes) = _figure(6, 3)
    for stage in sorted(kl_by_position, key=lambda name: list(STAGE_STYLES).index(name) if name in STAGE_STYLES else 9):
        per_sample = kl_by_position[stage]
        if not any(per_sample):
            continue
        length = max(len(sample) for sample in per_sample)
        padded = np.full((len(per_sample), length), np.nan)
        for row, sample in zip(padded, per_sample):
            row[: len(sample)] = sample
        colour, style = STAGE_STYLES.get(stage, (None, "-"))
        axes.plot(np.maximum(np.nanmean(padded, axis=0), _FLOOR), label=stage, color=colour, linestyle=style,
                  linewidth=1.5)
    axes.set_yscale("log")
    axes.set_xlabel("position in the sample")
    axes.set_ylabel("KL from float (nats)")
    axes.set_title("KL divergence from the float model, mean over samples", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return path


def size_against_agreement(rows: list[dict], title: str, path: Path) -> Path:
    """One point per target: artifact size against top-1 agreement with float (its 95% interval as an error bar),
    coloured by decode speed where the runner measured one; mean KL in a second panel."""
    pyplot, (figure, (top1, kl)) = _figure(10, 4, panels=2)
    sizes = np.array([row["megabytes"] for row in rows])
    speeds = [row["decode"] for row in rows]
    colour = np.array([speed if speed else np.nan for speed in speeds])
    known = colour[np.isfinite(colour)]
    low, high = (known.min(), known.max()) if known.size else (0.0, 1.0)
    scale = {"vmin": low - 1, "vmax": high + 1} if low == high else {"vmin": low, "vmax": high}
    for axes, name in ((top1, "top1"), (kl, "kl")):
        values = np.array([row[name] for row in rows], dtype=float)
        if name == "top1":
            low = values - np.array([row["top1_low"] for row in rows])
            high = np.array([row["top1_high"] for row in rows]) - values
            axes.errorbar(sizes, values, yerr=[low, high], fmt="none", ecolor="grey", elinewidth=1, zorder=1)
        points = axes.scatter(sizes, values, c=colour, cmap="viridis", s=60, zorder=2, edgecolors="black",
                              plotnonfinite=True, **scale)
        for index, (row, x, y) in enumerate(zip(rows, sizes, values)):  # staggered: targets of one size overlap
            axes.annotate(row["recipe"], (x, y), textcoords="offset points", xytext=(5, 4 - 11 * (index % 3)),
                          fontsize=7)
        axes.set_xlabel("artifact size (MB, .pte + .ptd)")
    top1.set_ylabel("top-1 agreement with float")
    kl.set_ylabel("mean KL from float (nats)")
    if np.isfinite(colour).any():
        figure.colorbar(points, ax=kl, label="decode tok/s (C++ runner)")
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return path
