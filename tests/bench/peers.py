"""Benchmark: xportbuild against optimum-executorch (`optimum-cli export executorch`) on the same weights, options
and machine, in one run. Prints one table with ratios (xportbuild / optimum).

    python tests/bench/peers.py [--target gemma3-xnnpack-8da8w-shared] [--work DIR] [--skip-peer]

xportbuild, in a scratch copy of this repo's recipes/ with an empty cache (a truly cold build, fetch included):
cold build, no-op rebuild, a lowering-only change (`extract_delegate_segments` flipped), a quantization-only change
(`qparams = "hqq"`), each with the stages that ran (from the events log). Peak RSS is the build process's own
(os.wait4), as for the peer.

optimum-executorch runs from PyPI in its own virtual environment (created under --work on first use; installed
from the package index, no model download) on the folder xportbuild's fetch stage wrote, with the recipe's options:
linears, embeddings, custom SDPA / KV cache and max_seq_len. Both .pte files are then run in ExecuTorch's C++ LLM
runner (decode and prefill tok/s, two rounds each) and teacher-forced on the target's verification samples against
the float model (top-1, mean KL), by the same code verify uses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # this checkout's xportbuild, also where another is installed
from xportbuild.keys import ALGORITHM, SCHEMA  # noqa: E402  (after the checkout is on sys.path)
PEER_PACKAGES = ("torch==2.13.0", "executorch==1.4.1", "torchao==0.18.0", "optimum-executorch==1.1.0")
# The 4-bit/8-bit options optimum names the same way the recipes do.
PEER_LINEARS = {"8da8w": "8da8w", "8da4w": "8da4w", "4w": "4w", "8w": "8w"}
# About 32 tokens for Gemma's tokenizer: the prefill figure is one call over the prompt.
RUNNER_PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
                 "combined movable metal type, oil-based ink and a wooden press adapted from wine making")
RUNNER_NEW_TOKENS = 64
# A quantization-only change per rounding algorithm (GPTQ refuses HQQ scales).
QUANTIZATION_CHANGE = {"none": 'qparams = "hqq"', "gptq": "damping = 0.05"}


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_rss_mb: float
    ok: bool
    built: tuple[str, ...] = ()


def measured(command: list[str], cwd: Path, env: dict, log: Path) -> Run:
    """Wall time and peak RSS of one process (its own, as the kernel accounts it)."""
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    return Run(time.perf_counter() - started, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status) == 0)


class Scratch:
    """A throwaway project with this repo's recipes and dodo.py and an empty cache."""

    def __init__(self, work: Path):
        self.root = Path(tempfile.mkdtemp(prefix="xportbuild-peers-", dir=work))
        shutil.copytree(REPO / "recipes", self.root / "recipes")
        shutil.copy(REPO / "dodo.py", self.root / "dodo.py")
        self.cache = self.root / "cache"
        self.env = {**os.environ, "XPORTBUILD_CACHE": str(self.cache), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        self.log = self.root / "bench.log"

    def _events(self) -> list[dict]:
        path = self.root / ".xportbuild" / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def doit(self, task: str) -> Run:
        mark = len(self._events())
        run = measured([sys.executable, "-m", "doit", task], self.root, self.env, self.log)
        built = tuple(e["stage"] for e in self._events()[mark:] if e["event"] == "built")
        return Run(run.seconds, run.peak_rss_mb, run.ok, built)

    def edit_recipe(self, name: str, table: str, line: str) -> None:
        """Set `line` (key = value) in the recipe's [table], replacing the key's current value."""
        path = self.root / "recipes" / "recipes" / f"{name}.toml"
        lines, key = path.read_text().splitlines(), line.split("=")[0].strip()
        start = lines.index(f"[{table}]")
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
        kept = [text for text in lines[start + 1:end] if text.split("=")[0].strip() != key]
        path.write_text("\n".join(lines[:start + 1] + [line] + kept + lines[end:]) + "\n")

    def recipe(self, name: str) -> dict:
        import tomllib

        return tomllib.loads((self.root / "recipes" / "recipes" / f"{name}.toml").read_text())

    def manifest(self, target: str) -> dict:
        return json.loads((self.root / "artifacts" / target / "manifest.json").read_text())

    def entry(self, key: str) -> Path:
        return self.cache / SCHEMA / ALGORITHM / key[:2] / key


STOCK_LOWER = """
import sys
import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
from xportbuild.stages.program import load_target_programs

programs = load_target_programs([__import__("pathlib").Path(sys.argv[1])])
with torch.no_grad():
    edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    edge.to_executorch()
"""


def stock_lower(scratch: Scratch, program_dir: Path) -> Run:
    """ExecuTorch's stock `to_edge_transform_and_lower` + `to_executorch` on the same programs (no custom passes,
    no shared table, no metadata methods: the core of the lower stage, as a user would call it)."""
    return measured([sys.executable, "-c", STOCK_LOWER, str(program_dir)], scratch.root, scratch.env, scratch.log)


def peer_venv(work: Path) -> Path:
    venv = work / "optimum-venv"
    if not (venv / "bin" / "optimum-cli").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *PEER_PACKAGES], check=True)
    return venv


def peer_export(venv: Path, model_dir: Path, recipe: dict, max_seq_len: int, out: Path, log: Path) -> Run:
    quantize, export = recipe["quantize"], recipe.get("export", {})
    command = [str(venv / "bin" / "optimum-cli"), "export", "executorch", "--model", str(model_dir),
               "--task", "text-generation", "--recipe", "xnnpack", "--max_seq_len", str(max_seq_len),
               "--output_dir", str(out)]
    if quantize.get("linear", "none") != "none":
        command += ["--qlinear", PEER_LINEARS[quantize["linear"]]]
        if quantize.get("linear_group_size"):
            command += ["--qlinear_group_size", str(quantize["linear_group_size"])]
    if quantize.get("embedding", "none") != "none":
        command += ["--qembedding", quantize["embedding"]]
    command += ["--use_custom_sdpa"] * bool(export.get("custom_sdpa")) + \
               ["--use_custom_kv_cache"] * bool(export.get("custom_kv_cache"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    return measured(command, out.parent, env, log)


def runner_round(pte: Path, tokenizer: Path) -> tuple[float | None, float | None]:
    """(decode, prefill) tok/s of one generation in ExecuTorch's C++ LLM runner."""
    from xportbuild import llm_runner

    figures = llm_runner.generate(pte, tokenizer, RUNNER_PROMPT, RUNNER_NEW_TOKENS)
    return figures.decode_tokens_per_s, figures.prefill_tokens_per_s


def runner_speeds(pte: Path, tokenizer: Path) -> list[tuple[float | None, float | None]]:
    """(decode, prefill) tok/s of two rounds in ExecuTorch's C++ LLM runner."""
    return [runner_round(pte, tokenizer) for _ in range(2)]


def agreement(pte: Path, reference_dir: Path) -> dict:
    """Top-1 agreement and mean KL against the float model, teacher-forced on the recorded verification calls."""
    from xportbuild import runtime
    from xportbuild.models.methods import load_samples, replay
    from xportbuild.quality import method_quality, sample_quality

    samples = load_samples(reference_dir)
    call = runtime.pte_call(pte)
    per_sample = [sample_quality(replay(call, sample, {"forward"}), sample.outputs, sample.methods, ("forward",))
                  for sample in samples]
    numbers = method_quality(per_sample)["forward"]
    return {"top1": numbers["top1"], "kl_mean": numbers["kl_mean"]}


def _ratio(ours: float | None, theirs: float | None) -> str:
    return f"{ours / theirs:.2f}" if ours and theirs else "-"


def _row(name: str, ours, theirs, unit: str = "", fmt: str = ".1f") -> str:
    show = lambda value: "-" if value is None else f"{value:{fmt}}{unit}"  # noqa: E731
    return f"| {name} | {show(ours)} | {show(theirs)} | {_ratio(ours, theirs)} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="gemma3-xnnpack-8da8w-shared")
    parser.add_argument("--work", default=str(REPO / ".xportbuild" / "bench"))
    parser.add_argument("--skip-peer", action="store_true", help="only xportbuild's rows")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ours = Scratch(work)
    task = f"export:{args.target}"
    print(f"scratch project {ours.root}; commands and output in {ours.log}", flush=True)

    cold = ours.doit(task)
    if not cold.ok:
        sys.exit(f"cold build failed: see {ours.log}")
    manifest = ours.manifest(args.target)
    stage_seconds = {stage: round(row["seconds"]) for stage, row in manifest["stages"].items()}
    noop = ours.doit(task)
    recipe_name = manifest["recipe"]
    ours.edit_recipe(recipe_name, "lower", "extract_delegate_segments = false")
    lowering = ours.doit(task)
    algorithm = ours.recipe(recipe_name)["quantize"].get("algorithm", "none")
    ours.edit_recipe(recipe_name, "quantize", QUANTIZATION_CHANGE[algorithm])
    quantization = ours.doit(task)
    artifact = manifest["stages"]["lower"]["result"]["artifact_bytes"]
    pte = ours.entry(manifest["stages"]["lower"]["key"]) / "model.pte"
    model_dir = ours.entry(manifest["stages"]["fetch"]["key"])
    reference_dir = ours.entry(manifest["stages"]["reference"]["key"])
    quality = manifest["stages"]["verify"]["result"]["vs_reference"]
    stock = stock_lower(ours, ours.entry(manifest["stages"]["quantize"]["key"]))

    peer = peer_pte = peer_bytes = peer_quality = None
    if not args.skip_peer:
        import tomllib

        recipe = tomllib.loads((REPO / "recipes" / "recipes" / f"{recipe_name}.toml").read_text())
        model = tomllib.loads((REPO / "recipes" / "models" / f"{args.target.split('-')[0]}.toml").read_text())
        venv = peer_venv(work)
        out = ours.root / "optimum"
        out.mkdir()
        peer = peer_export(venv, model_dir, recipe, model["max_seq_len"], out, ours.log)
        peer_pte = next(out.glob("*.pte"), None)
        peer_bytes = sum(path.stat().st_size for path in out.iterdir() if path.suffix in (".pte", ".ptd"))
        if peer.ok and peer_pte:
            try:
                peer_quality = agreement(peer_pte, reference_dir)
            except Exception as err:  # noqa: BLE001 - a table row, not a crash: say why it is missing
                print(f"optimum's .pte could not be run on the verification calls: {err}")

    speeds = runner_speeds(pte, model_dir / "tokenizer.json")
    peer_speeds = [(None, None)] * 2
    if peer_pte:
        try:
            peer_speeds = runner_speeds(peer_pte, model_dir / "tokenizer.json")
        except RuntimeError as err:
            print(f"ExecuTorch's LLM runner could not run optimum's .pte: {err}")
    mb = 2 ** 20
    print(f"\n{args.target}: xportbuild stages (cold): {stage_seconds}")
    print(f"lowering-only change rebuilt {list(lowering.built)}; quantization-only change rebuilt "
          f"{list(quantization.built)} (ok: {quantization.ok})\n")
    print("| | xportbuild | optimum-executorch | ratio |\n|---|---|---|---|")
    print(_row("cold build, s (ours: fetch + verification included)", cold.seconds, peer and peer.seconds))
    print(_row("cold build without fetch, s", cold.seconds - stage_seconds.get("fetch", 0), peer and peer.seconds))
    print(_row("peak RSS, MB", cold.peak_rss_mb, peer and peer.peak_rss_mb, fmt=".0f"))
    print(_row("no-op rebuild, s", noop.seconds, peer and peer.seconds, fmt=".2f"))
    print(_row("lowering-only change, s", lowering.seconds, peer and peer.seconds))
    print(_row("quantization-only change, s", quantization.seconds, peer and peer.seconds))
    print(_row("artifact, MB", artifact / mb, peer_bytes and peer_bytes / mb))
    for index in range(2):
        print(_row(f"decode tok/s, C++ runner, round {index + 1}", speeds[index][0], peer_speeds[index][0]))
        print(_row(f"prefill tok/s, C++ runner, round {index + 1}", speeds[index][1], peer_speeds[index][1]))
    print(_row("top-1 agreement with float", quality["top1"], peer_quality and peer_quality["top1"], fmt=".4f"))
    print(_row("mean KL vs float", quality["kl_mean"], peer_quality and peer_quality["kl_mean"], fmt=".5f"))
    print(f"\nour lowering-only rebuild / our cold build: {lowering.seconds / cold.seconds:.3f}")
    print(f"our lower stage {stage_seconds['lower']} s / stock to_edge_transform_and_lower + to_executorch "
          f"{stock.seconds:.0f} s on the same program: {stage_seconds['lower'] / stock.seconds:.2f}")


if __name__ == "__main__":
    main()
