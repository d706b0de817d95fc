"""Benchmark: published artifacts side by side, for a scheme table (one row per artifact folder).

    python tests/bench/artifacts.py artifacts/gemma3-xnnpack-8da4w OTHER_ARTIFACT_DIR ... [--rounds 3]

Size is `model.pte` + `model.ptd`, as the lower stage recorded it. Agreement with float is what verify recorded in the manifest (the .pte
teacher-forced on the verification prompts, 95% bootstrap interval over prompts). Quantize seconds are the
manifest's (the build that made the entry: read them as measured under that build's load). Decode and prefill
tok/s come from ExecuTorch's C++ LLM runner on tests/bench/peers.py's 33-token prompt, the artifacts taking
turns round by round so that a change of machine load touches all of them alike; the row shows the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import runner_round  # noqa: E402


def _rounding(manifest: dict) -> str:
    if "quantize" not in manifest["stages"]:
        return "none (float)"
    rounding = manifest["stages"]["quantize"]["result"]["quantized"].get("rounding")
    if rounding is None:
        return "nearest"
    return f"{rounding['algorithm']} (damping {rounding['damping']}, {rounding['layers']} layers)"


def _agreement(manifest: dict) -> str:
    numbers = manifest["stages"]["verify"]["result"]["vs_reference"]
    low, high = numbers["top1_interval"]
    return (f"{numbers['top1']:.3f} [{low:.3f}, {high:.3f}] | {numbers['kl_mean']:.3f} | "
            f"{numbers['cosine_mean']:.4f}")


@contextmanager
def _quiet_stdout():
    """The C++ runner writes its text and stats to file descriptor 1 itself; keep them out of the table."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _speeds(folders: list[Path], rounds: int) -> list[list[tuple[float | None, float | None]]]:
    measured: list[list[tuple[float | None, float | None]]] = [[] for _ in folders]
    for round_index in range(rounds):
        for index, folder in enumerate(folders):
            with _quiet_stdout():
                measured[index].append(runner_round(folder / "model.pte", folder / "tokenizer.json"))
            print(f"round {round_index + 1}: {folder.name}: decode, prefill tok/s {measured[index][-1]}",
                  file=sys.stderr, flush=True)
    return measured


def _median(values: list[float | None]) -> str:
    present = [value for value in values if value]
    return f"{statistics.median(present):.1f}" if present else "-"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in args.folders]
    speeds = _speeds(args.folders, args.rounds)
    print("| target | rounding | MB | top-1 vs float [95%] | mean KL | mean cosine | quantize s | "
          "decode tok/s | prefill tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for manifest, rounds in zip(manifests, speeds):
        stages = manifest["stages"]
        megabytes = stages["lower"]["result"]["artifact_bytes"] / 1e6
        quantize_s = f"{stages['quantize']['seconds']:.0f}" if "quantize" in stages else "-"
        print(f"| {manifest['target']} | {_rounding(manifest)} | {megabytes:.1f} | {_agreement(manifest)} | "
              f"{quantize_s} | {_median([r[0] for r in rounds])} | {_median([r[1] for r in rounds])} |")
    print(f"\nrunner rounds per artifact (decode, prefill tok/s): "
          + "; ".join(f"{m['target']}: {[tuple(round(v or 0, 1) for v in r) for r in rounds]}"
                      for m, rounds in zip(manifests, speeds)))


if __name__ == "__main__":
    main()
