"""Verify stage: the .pte in the ExecuTorch runtime against the program it came from and the float reference.

Every method is replayed on the float model's recorded calls (against the float outputs and the program's), and
the app's whole chain runs on the .pte. Where the .pte's outcome leaves the float model's, the program, fed the
same context, must have nearly tied between the two choices."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xportbuild.console import progress
from xportbuild.errors import RuntimeLacksBackend, VerifyFailed
from xportbuild.gates import Missed, accepting, accepting_tolerances, missed, threshold_checks
from xportbuild.models.kinds import Kind, kind_of
from xportbuild.quality import (first_divergence, merge, method_quality, neighbour_rows, position_kl,
                                sample_quality)
from xportbuild.recipe.spec import Tolerances
from xportbuild.stages.program import KL_BY_POSITION


@dataclass(frozen=True)
class PteRun:
    """What the .pte did on one sample: its outputs on the recorded calls, and its own outcome (generated tokens or
    labels) with the time the app's chain took."""

    outputs: list[np.ndarray | None]
    tokens: list[int]
    seconds: float


def pte_sequence_call(pte_path: Path, runner_metadata: dict):
    """The .pte's methods, called as recorded: a prompt's whole sequence per call, token by token for a program of
    one token per call."""
    from xportbuild import runtime
    from xportbuild.models.methods import sequence_call

    return sequence_call(runtime.pte_call(pte_path), runner_metadata)


def run_pte(pte_call, samples: list, kind: Kind, facts: dict, max_new_tokens: int) -> list[PteRun]:
    from xportbuild.models.methods import replay

    runs, wrapper = [], kind.wrapper()
    for sample in progress(samples, desc="the .pte on the reference's samples", unit="sample"):
        outputs = replay(pte_call, sample, set(kind.methods))
        started = time.perf_counter()
        tokens = wrapper.run(pte_call, sample.inputs, facts, max_new_tokens).tokens
        runs.append(PteRun(outputs, tokens, time.perf_counter() - started))
    return runs


def outcome_row(pte_tokens: list[int], program, reference: list[int]) -> dict:
    """Where the .pte's outcome first leaves the float model's, and how much the program, fed that same context
    (the float outcome so far), prefers its own choice over the .pte's there (0: the program chose the .pte's token
    too, so the departure is quantization's, not lowering's). `program`: the program's forced run."""
    at = first_divergence(pte_tokens, reference)
    margin = None
    if at is not None and at < min(len(pte_tokens), len(program.scores)):
        row = program.scores[at]
        margin = float(row.max() - row[pte_tokens[at]])
    return {"pte": pte_tokens, "program": program.tokens, "reference": reference,
            "diverges_from_reference_at": at, "diverges_from_program_at": first_divergence(pte_tokens, program.tokens),
            "program_margin_at_divergence": margin, "lengths_differ": len(pte_tokens) != len(reference)}


def pooled(per_method: dict[str, dict], logit_methods: tuple[str, ...]) -> dict:
    """One set of numbers for a stage: its logit method's (what an app's choices come from), else all methods'."""
    logits = [per_method[method] for method in logit_methods if method in per_method]
    if len(logits) == 1:
        return logits[0]
    summaries = logits or list(per_method.values())
    return merge([{name: value for name, value in numbers.items() if not name.endswith("_interval") and name != "prompts"}
                  for numbers in summaries])


def measure(pte_runs: list[PteRun], program_results: list[tuple[list, object]], samples: list, kind: Kind) -> dict:
    """All numbers verify judges: per method, the .pte's outputs against the float ones and the program's, and the
    program's against the float ones; per sample, the .pte's outcome against the float one, judged by the program's
    forced run (`stages.replay.program_results`)."""
    compared, outcomes = {"vs_reference": [], "vs_program": [], "program_vs_reference": []}, []
    kl_by_position: dict[str, list] = {"program": [], ".pte": []}
    for run, sample, (program_outputs, forced) in zip(pte_runs, samples, program_results):
        for stage, outputs in (("program", program_outputs), (".pte", run.outputs)):
            kl_by_position[stage].append(position_kl(outputs, sample.outputs, sample.methods, kind.logit_methods))
        for name, actual, expected in (("vs_reference", run.outputs, sample.outputs),
                                       ("vs_program", run.outputs, program_outputs),
                                       ("program_vs_reference", program_outputs, sample.outputs)):
            compared[name].append(sample_quality(actual, expected, sample.methods, kind.logit_methods))
        outcomes.append(outcome_row(run.tokens, forced, sample.outcome.tokens))
    per_method = {name: method_quality(numbers) for name, numbers in compared.items()}
    overall = {name: pooled(numbers, kind.logit_methods) for name, numbers in per_method.items()}
    stages = {"program": overall["program_vs_reference"],
              ".pte": {**overall["vs_reference"],
                       "greedy_departs_at": [outcome["diverges_from_reference_at"] for outcome in outcomes]}}
    seconds, tokens = sum(run.seconds for run in pte_runs), sum(len(run.tokens) for run in pte_runs)
    neighbours = {"neighbours": neighbour_rows([run.outputs[0] for run in pte_runs],
                                               [outputs[0] for outputs, _ in program_results],
                                               [sample.outputs[0] for sample in samples])} \
        if kind.compares_neighbours else {}
    return {**neighbours, "methods": {method: {name: per_method[name][method] for name in compared} for method in per_method["vs_reference"]},
            "vs_reference": overall["vs_reference"], "vs_program": overall["vs_program"],
            "greedy": outcomes, "quality_by_stage": stages, KL_BY_POSITION: kl_by_position,
            "seconds_per_sample": seconds / max(len(samples), 1),
            "generate_tokens_per_s": tokens / seconds if seconds else None}


def fail(target: str, failures: list[Missed], numbers: dict, pte_path: Path) -> VerifyFailed:
    """The failure, carrying the .pte (and its .ptd) that failed so the user can inspect it outside the cache."""
    from xportbuild.runtime import data_file

    ptd = data_file(pte_path)
    keep = (pte_path, *([Path(ptd)] if ptd else []))
    return VerifyFailed(target, [failure.text for failure in failures], numbers, accepting_tolerances(failures), keep)


def judge(numbers: dict, tolerances: Tolerances, several_methods: bool) -> list[Missed]:
    """Every threshold a method misses, and every outcome of the .pte that leaves the float one where its program
    did not nearly tie."""
    failures = []
    for method, compared in numbers["methods"].items():
        checks = missed(threshold_checks(compared["vs_reference"], compared["vs_program"], tolerances))
        failures += [dataclasses.replace(failure, text=f"method {method}: {failure.text}") for failure in checks] \
            if several_methods else checks
    for index, item in enumerate(numbers["greedy"]):
        margin = item["program_margin_at_divergence"]
        if margin is not None and margin > tolerances.greedy_tie_margin:
            failures.append(Missed(f"sample {index}: the .pte's outcome leaves the float model's at "
                                   f"{item['diverges_from_reference_at']} with a choice its program ranks {margin:.3g} "
                                   f"below its own (allowed tie margin {tolerances.greedy_tie_margin:g})",
                                   "greedy_tie_margin", "<=", accepting(margin, "<=")))
        elif margin is None and item["lengths_differ"]:  # no tolerance accepts an outcome of another length
            failures.append(Missed(f"sample {index}: the .pte's outcome has {len(item['pte'])} tokens, the float "
                                   f"model's {len(item['reference'])}", "", "", 0.0))
    for index, row in enumerate(numbers.get("neighbours", {}).get("rows", ())):
        if row["program_margin"] is not None and row["program_margin"] > tolerances.neighbour_tie_margin:
            failures.append(Missed(f"sample {index}: its nearest neighbour by the .pte is sample {row['pte']}, by the "
                                   f"float model sample {row['reference']}; its program ranks the .pte's "
                                   f"{row['program_margin']:.3g} (cosine) below its own choice (allowed tie margin "
                                   f"{tolerances.neighbour_tie_margin:g})", "neighbour_tie_margin", "<=",
                                   accepting(row["program_margin"], "<=")))
    return failures


def quantized_eager_numbers(program_dirs: list[Path], logit_methods: tuple[str, ...]) -> tuple[dict | None, list]:
    """The quantized eager methods' numbers, written by the quantize stage (None for a float target), and the
    KL at every position of its logit method."""
    from xportbuild.stages.program import EAGER_QUALITY_FILE, KL_BY_POSITION

    per_method, kl_by_position = {}, []
    for folder in program_dirs:
        if (folder / EAGER_QUALITY_FILE).is_file():
            numbers = json.loads((folder / EAGER_QUALITY_FILE).read_text())
            if set(numbers) & set(logit_methods):
                kl_by_position = numbers.get(KL_BY_POSITION, [])
            per_method.update({name: value for name, value in numbers.items() if name != KL_BY_POSITION})
    return (pooled(per_method, logit_methods) if per_method else None), kl_by_position


@dataclass(frozen=True)
class Verifying:
    """What a verify reads besides the .pte: entries of the programs, their replay, the reference, the model."""

    program_dirs: list[Path]
    replay_dir: Path
    reference_dir: Path
    model_dir: Path


def verify(pte_path: Path, inputs: Verifying, tolerances: Tolerances, target: str, task: str,
           max_new_tokens: int) -> dict:
    """The .pte against its programs (as replayed) and the float reference, and in the app's own runtime if the kind
    has one; raises VerifyFailed."""
    from xportbuild.models.methods import load_samples
    from xportbuild.stages.program import MODEL_FACTS_FILE
    from xportbuild.stages.reference import TEXTS_FILE
    from xportbuild.stages.replay import load_replay

    kind = kind_of(task)
    samples = load_samples(inputs.reference_dir)
    program_dirs, reference_dir, model_dir = inputs.program_dirs, inputs.reference_dir, inputs.model_dir
    facts = json.loads((program_dirs[0] / MODEL_FACTS_FILE).read_text())["runner"]
    pte_runs = run_pte(pte_sequence_call(pte_path, facts), samples, kind, facts, max_new_tokens)
    numbers = measure(pte_runs, load_replay(inputs.replay_dir, samples), samples, kind)
    eager, eager_kl = quantized_eager_numbers(program_dirs, kind.logit_methods)
    if eager:  # quantized methods: where the loss starts
        numbers["quality_by_stage"] = {"quantized eager": eager, **numbers["quality_by_stage"]}
        numbers[KL_BY_POSITION] = {"quantized eager": eager_kl, **numbers[KL_BY_POSITION]}
    failures = judge(numbers, tolerances, len(kind.methods) > 1)
    wrapper = kind.wrapper()
    if hasattr(wrapper, "app_check"):  # what an app's own runtime makes of the artifact
        prompt = json.loads((reference_dir / TEXTS_FILE).read_text())[0]["prompt"]
        numbers["runner"], problem = wrapper.app_check(pte_path, model_dir, prompt, pte_runs[0].tokens, facts)
        if problem:
            failures.append(Missed(problem, "", "", 0.0))
    if failures:
        raise fail(target, failures, numbers, pte_path)
    return numbers


def check_runtime(lower_dir: Path, target: str) -> None:
    """Stop, before reading anything else, when this runtime cannot run the .pte's delegates: say where it runs, that
    the lowered program waits in the cache under its key, and how to verify it there."""
    from xportbuild import backends
    from xportbuild.stages.lower import DELEGATES_FILE

    missing = sorted(backends.missing_delegates(set(json.loads((lower_dir / DELEGATES_FILE).read_text()))))
    if not missing:
        return
    where = "; ".join(f"{name} runs on {module.RUNS_ON}" for name in missing if (module := backends.by_delegate(name)))
    raise RuntimeLacksBackend(
        f"this machine's ExecuTorch runtime has no {', '.join(missing)} ({where}); the .pte is lowered and cached "
        f"(lower entry {lower_dir.name}); to verify and publish it, run `doit export:{target}` on such a machine "
        "sharing this cache (XPORTBUILD_REMOTE_CACHE): it pulls every stage up to lower and builds nothing else")


def run(node, inputs: dict[str, Path], out_dir: Path, workspace) -> dict:
    from xportbuild.stages.lower import PTE_FILE
    from xportbuild.stages.program import program_inputs

    check_runtime(inputs["lower"], node.subject)
    reading = Verifying(list(program_inputs(inputs).values()), inputs["replay"], inputs["reference"], inputs["fetch"])
    numbers = verify(inputs["lower"] / PTE_FILE, reading, Tolerances(**node.params["tolerances"]), node.subject,
                     node.params["task"], node.params["max_new_tokens"])
    return _write(numbers, out_dir, tuple(node.params["backends"]))


def _write(numbers: dict, out_dir: Path, backend_names: tuple[str, ...]) -> dict:
    """verification.json, with the machine that measured it: the same .pte's numbers differ by CPU in their
    last bits, and a shared cache may serve them elsewhere. A backend's runtime may choose its own precision there."""
    from xportbuild import backends
    from xportbuild.runtime import machine

    numbers["machine"] = machine()
    for name in backend_names:
        numbers["machine"].update(backends.runtime_facts(name))
    (out_dir / "verification.json").write_text(json.dumps(numbers, indent=1))
    return numbers
