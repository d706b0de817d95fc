"""Benchmark: how much verification numbers move without any defect, to set tolerances from a measured spread.

    python tests/bench/spread.py gemma3-xnnpack-8da8w-shared [--cache DIR] [--kernels default avx2 avx512] [--threads 1 2]
                                 [--emulate Haswell Nehalem]

For a target whose program and .pte are built (cache: this repo's .xportbuild/cache), every configuration
re-runs, in a fresh process, what differs between two healthy machines: the float reference (greedy text and
logits, with torch's kernels of that configuration), the program and the .pte (ExecuTorch's threadpool). The
kernels are torch's ATEN_CPU_CAPABILITY paths this CPU can take; the threads are torch's and ExecuTorch's.
Prints one row per configuration and the spread of each gated number.

XNNPACK picks its kernels from the CPU's features, which no setting overrides. `--emulate` runs the .pte under
`qemu-x86_64 -cpu MODEL` (Debian's qemu-user), whose emulated CPU lacks AVX-512 (Haswell: AVX2 + FMA; Nehalem:
SSE4.2), so XNNPACK takes the kernels another machine would; the float reference and the program stay native
(the rows above show torch's kernel path does not move them), so those rows isolate XNNPACK's kernel path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# What one configuration reports: (name in the table, where it is in verify's numbers).
COLUMNS = (("top-1", ("vs_reference", "top1")), ("top-1 lo", ("vs_reference", "top1_interval", 0)),
           ("top-1 hi", ("vs_reference", "top1_interval", 1)), ("mean KL", ("vs_reference", "kl_mean")),
           ("mean cos", ("vs_reference", "cosine_mean")), ("max abs", ("vs_reference", "max_abs")),
           ("prog min cos", ("vs_program", "cosine_min")), ("prog max abs", ("vs_program", "max_abs")),
           ("prog top-1", ("vs_program", "top1")), ("prog mean KL", ("vs_program", "kl_mean")),
           ("worst greedy margin", ("worst_margin",)))


def _entries(target: str, cache: Path) -> dict[str, str]:
    """Folders of the target's fetch, program and lower entries."""
    from xportbuild.build import Resolver, Workspace
    from xportbuild.plan import plan_targets
    from xportbuild.recipe import load_project

    plan = plan_targets(load_project(REPO / "recipes"))
    resolver = Resolver(plan, Workspace(cache, REPO / "artifacts", REPO / ".xportbuild"))
    node = plan.nodes[plan.targets[target].verify]
    folders = {name: resolver.entry(task) for name, task in node.inputs.items()}
    if any(entry is None for entry in folders.values()):
        sys.exit(f"build {target} up to its lower stage first: doit lower:{target}")
    target_spec = plan.targets[target].target
    return {**{name: str(entry.path) for name, entry in folders.items()}, "model_file": target_spec.model.file}


def _verifying(entries: dict[str, str], reference_dir: Path):
    """What verify reads: the model's kind, its facts, the recorded samples and how many tokens to generate."""
    from xportbuild.models.kinds import kind_of
    from xportbuild.models.methods import load_samples
    from xportbuild.recipe import load_project
    from xportbuild.stages.program import MODEL_FACTS_FILE

    model = next(t.model for t in load_project(REPO / "recipes") if t.model.file == entries["model_file"])
    facts = json.loads((Path(entries["program"]) / MODEL_FACTS_FILE).read_text())["runner"]
    return kind_of(model.task), facts, load_samples(reference_dir), model.verify.max_new_tokens


def pte_runs_to(entries: dict[str, str], out: Path) -> None:
    """In this (possibly emulated) process: the .pte's runs on the cached reference, saved for the native side."""
    import numpy as np

    from xportbuild import runtime
    from xportbuild.stages import verify

    kind, facts, samples, max_new_tokens = _verifying(entries, Path(entries["reference"]))
    pte = verify.pte_sequence_call(Path(entries["lower"]) / "model.pte", facts)
    runs = verify.run_pte(pte, samples, kind, facts, max_new_tokens)
    arrays = {f"out_{i}_{j}": output for i, run in enumerate(runs) for j, output in enumerate(run.outputs)
              if output is not None}
    arrays.update({f"tokens_{i}": np.array(run.tokens) for i, run in enumerate(runs)})
    np.savez(out, machine=json.dumps(runtime.machine()), **arrays)


def _measure(runs: list, entries: dict[str, str], reference_dir: Path) -> dict:
    """verify's numbers, the program's side computed here (in float32: verify reads it from the replay stage)."""
    from xportbuild.stages import verify
    from xportbuild.stages.replay import program_results

    kind, _, samples, _ = _verifying(entries, reference_dir)
    results = list(program_results([Path(entries["program"])], samples, kind.task))
    return verify.measure(runs, results, samples, kind)


def measure_emulated(entries: dict[str, str], cpu: str) -> dict | None:
    """The .pte run under an emulated CPU, compared natively with the cached reference and the program."""
    import numpy as np

    from xportbuild.stages import verify

    _, _, samples, _ = _verifying(entries, Path(entries["reference"]))
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "runs.npz"
        result = subprocess.run(["qemu-x86_64", "-cpu", cpu, sys.executable, __file__, "-", "--pte-runs", str(out),
                                 "--one", json.dumps(entries)], capture_output=True, text=True)
        if not out.is_file():  # e.g. a CPU older than the wheels' baseline: illegal instruction
            print(f"emulated {cpu} failed: {result.stderr.strip().splitlines()[-1]}", file=sys.stderr)
            return None
        with np.load(out) as data:
            runs = [verify.PteRun([data[f"out_{i}_{j}"] if f"out_{i}_{j}" in data.files else None
                                   for j in range(len(sample.calls))], data[f"tokens_{i}"].tolist(), 0.0)
                    for i, sample in enumerate(samples)]
            machine = json.loads(str(data["machine"]))
    return _with_worst_margin(_measure(runs, entries, Path(entries["reference"])), machine)


def measure_one(entries: dict[str, str], threads: int) -> dict:
    """In this process (its kernels set by the environment): reference, program and .pte numbers."""
    import torch
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    from xportbuild import runtime
    from xportbuild.recipe import load_project
    from xportbuild.stages import reference, verify

    torch.set_num_threads(threads)
    _unsafe_reset_threadpool(threads)
    model = next(t.model for t in load_project(REPO / "recipes") if t.model.file == entries["model_file"])
    with tempfile.TemporaryDirectory() as scratch:
        reference.reference(Path(entries["fetch"]), model.task, model.verify, model.max_seq_len, Path(scratch))
        kind, facts, samples, max_new_tokens = _verifying(entries, Path(scratch))
        pte = verify.pte_sequence_call(Path(entries["lower"]) / "model.pte", facts)
        runs = verify.run_pte(pte, samples, kind, facts, max_new_tokens)
        return _with_worst_margin(_measure(runs, entries, Path(scratch)), runtime.machine())


def _with_worst_margin(numbers: dict, machine: dict) -> dict:
    """verify's numbers, the largest greedy departure margin, and where they were measured."""
    margins = [item["program_margin_at_divergence"] or 0.0 for item in numbers["greedy"]]
    return {**numbers, "worst_margin": max(margins), "machine": machine}


def _value(numbers: dict, path: tuple) -> float:
    for step in path:
        numbers = numbers[step]
    return numbers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--cache", default=str(REPO / ".xportbuild" / "cache"))
    parser.add_argument("--kernels", nargs="*", default=["default", "avx2", "avx512"])
    parser.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--emulate", nargs="*", default=[], metavar="QEMU_CPU")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one configuration
    parser.add_argument("--pte-runs", help=argparse.SUPPRESS)  # internal: the emulated .pte's runs go here
    args = parser.parse_args()
    if args.pte_runs:
        pte_runs_to(json.loads(args.one), Path(args.pte_runs))
        return
    if args.one:
        print("RESULT " + json.dumps(measure_one(json.loads(args.one), args.threads[0])))
        return
    entries = _entries(args.target, Path(args.cache).resolve())
    rows = []
    for cpu in args.emulate:
        if (numbers := measure_emulated(entries, cpu)) is None:
            continue
        # /proc/cpuinfo is the host's under qemu-user; torch's own probe sees the emulated CPU.
        rows.append((f"emulated {cpu} (.pte only; torch sees {numbers['machine']['torch_kernels']})", numbers))
        print(f"measured emulated {cpu}", file=sys.stderr, flush=True)
    for kernels in args.kernels:
        for threads in args.threads:
            env = {**os.environ, "ATEN_CPU_CAPABILITY": kernels, "OMP_NUM_THREADS": str(threads)}
            result = subprocess.run([sys.executable, __file__, args.target, "--threads", str(threads), "--one",
                                     json.dumps(entries)], env=env, capture_output=True, text=True)
            line = next((line for line in result.stdout.splitlines() if line.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"configuration kernels={kernels} threads={threads} failed:\n{result.stderr[-3000:]}")
            numbers = json.loads(line.removeprefix("RESULT "))
            rows.append((f"{kernels} ({numbers['machine']['torch_kernels']}), {threads} threads", numbers))
            print(f"measured kernels={kernels} threads={threads}", file=sys.stderr, flush=True)
    print("| configuration | " + " | ".join(name for name, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for label, numbers in rows:
        print(f"| {label} | " + " | ".join(f"{_value(numbers, path):.4f}" for _, path in COLUMNS) + " |")
    print("| **spread (max - min)** | " + " | ".join(
        f"{max(_value(n, path) for _, n in rows) - min(_value(n, path) for _, n in rows):.4f}" for _, path in COLUMNS)
        + " |")
    print(f"\npositions per configuration: {', '.join(str(n['vs_reference']['positions']) for _, n in rows)}")


if __name__ == "__main__":
    main()
