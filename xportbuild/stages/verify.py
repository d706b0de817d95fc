"""Verify stage: the .pte in the ExecuTorch runtime against the program it came from and the float reference."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xportbuild.errors import VerifyFailed
from xportbuild.gates import Missed, accepting, accepting_tolerances, missed, threshold_checks
from xportbuild.quality import compare_logits, first_divergence, merge, summarize
from xportbuild.recipe.spec import Tolerances

# Written by the quantize stage: the quantized eager model's quality, before export and lowering.
EAGER_QUALITY_FILE = "eager_quality.json"


def greedy_check(pte_tokens: list[int], continuation: list[int], program_logits) -> dict:
    """Where the .pte's greedy text first leaves the float model's, and how much the program, teacher-forced on
    that same context (the float text so far), prefers its own choice over the .pte's there (0: the program
    chose the .pte's token too, so the departure is quantization's, not lowering's)."""
    at = first_divergence(pte_tokens, continuation)
    margin = None
    if at is not None and at < min(len(pte_tokens), len(continuation)):
        row = program_logits[len(program_logits) - len(continuation) + at]  # the row predicting token `at`
        margin = float(row.max() - row[pte_tokens[at]])
    return {"pte": pte_tokens, "reference": continuation, "diverges_from_reference_at": at,
            "program_margin_at_divergence": margin}


@dataclass(frozen=True)
class PteRun:
    """What the .pte did on one prompt: logits at every position teacher-forced in one call (its prefill path),
    and its greedy continuation decoded one token per call (its decode path)."""

    logits: np.ndarray
    tokens: list[int]
    decode_seconds: float


def run_pte(pte_step, references: list[dict]) -> list[PteRun]:
    from xportbuild.models import causal_lm

    runs = []
    for ref in references:
        prompt, continuation = ref["prompt"].tolist(), ref["greedy"].tolist()
        logits = causal_lm.teacher_forced_logits(pte_step, prompt, continuation)
        started = time.perf_counter()
        tokens = causal_lm.greedy(pte_step, prompt, len(continuation))
        runs.append(PteRun(logits, tokens, time.perf_counter() - started))
    return runs


def measure(pte_runs: list[PteRun], program_step, references: list[dict]) -> dict:
    """All numbers verify judges, for the `forward` method of a causal LM: the .pte's runs against the float
    reference and against its program teacher-forced on the same sequences."""
    from xportbuild.models import causal_lm

    vs_reference, vs_program, program_vs_reference, greedy = [], [], [], []
    for run, ref in zip(pte_runs, references):
        prompt, continuation = ref["prompt"].tolist(), ref["greedy"].tolist()
        program_logits = causal_lm.teacher_forced_logits(program_step, prompt, continuation)
        vs_reference.append(compare_logits(run.logits, ref["logits"]))
        vs_program.append(compare_logits(run.logits, program_logits))
        program_vs_reference.append(compare_logits(program_logits, ref["logits"]))
        greedy.append(greedy_check(run.tokens, continuation, program_logits))
    stages = {"program": summarize(program_vs_reference), ".pte": summarize(vs_reference)}
    stages[".pte"]["greedy_departs_at"] = [item["diverges_from_reference_at"] for item in greedy]
    seconds = sum(run.decode_seconds for run in pte_runs)
    return {"vs_reference": stages[".pte"], "vs_program": summarize(vs_program), "greedy": greedy,
            "quality_by_stage": stages,
            "generate_tokens_per_s": sum(len(run.tokens) for run in pte_runs) / seconds if seconds else None}


def fail(target: str, failures: list[Missed], numbers: dict, pte_path: Path) -> VerifyFailed:
    """The failure, carrying the .pte (and its .ptd) that failed so the user can inspect it outside the cache."""
    from xportbuild.runtime import data_file

    ptd = data_file(pte_path)
    keep = (pte_path, *([Path(ptd)] if ptd else []))
    return VerifyFailed(target, [failure.text for failure in failures], numbers, accepting_tolerances(failures), keep)


def judge(numbers: dict, tolerances: Tolerances) -> list[Missed]:
    """Every threshold the numbers miss."""
    failures = missed(threshold_checks(numbers["vs_reference"], numbers["vs_program"], tolerances))
    for index, item in enumerate(numbers["greedy"]):
        margin = item["program_margin_at_divergence"]
        if margin is not None and margin > tolerances.greedy_tie_margin:
            failures.append(Missed(f"prompt {index}: the .pte's greedy text leaves the float model's at token "
                                   f"{item['diverges_from_reference_at']} with a token its program ranks {margin:.3g} "
                                   f"logits below its own choice (allowed tie margin {tolerances.greedy_tie_margin:g})",
                                   "greedy_tie_margin", "<=", accepting(margin, "<=")))
    return failures


@dataclass(frozen=True)
class RunnerInputs:
    """What an app gives ExecuTorch's LLM runner: the tokenizer and a prompt as text."""

    tokenizer_dir: Path
    prompt: str


def runner_check(pte_path: Path, inputs: RunnerInputs, pte_greedy: list[int], eos_ids: list[int]) -> dict:
    """Generate with the C++ runner as an app would; its text must be the .pte's greedy text up to an end token.

    Surrounding whitespace is not compared: tokenizers' decoders differ in stripping it, the model does not."""
    from transformers import AutoTokenizer

    from xportbuild import llm_runner

    try:
        figures = llm_runner.generate(pte_path, inputs.tokenizer_dir / "tokenizer.json", inputs.prompt,
                                      len(pte_greedy))
    except RuntimeError as err:  # e.g. an empty prompt, or a tokenizer.json the C++ tokenizer cannot read
        return {"error": str(err).strip().splitlines()[0], "matches_pte_greedy": None}
    ends = [index for index, token in enumerate(pte_greedy) if token in eos_ids]
    expected = AutoTokenizer.from_pretrained(inputs.tokenizer_dir).decode(pte_greedy[: ends[0] if ends else None])
    return {**figures.as_dict(), "expected": expected, "matches_pte_greedy": figures.text.strip() == expected.strip()}


def verify(pte_path: Path, program_dir: Path, reference_dir: Path, tolerances: Tolerances, target: str,
           runner: RunnerInputs | None = None) -> dict:
    """Numbers of the .pte against the pre-lowering program and the float reference; raises VerifyFailed."""
    from xportbuild import runtime
    from xportbuild.models import causal_lm
    from xportbuild.stages.program import MODEL_FACTS_FILE, load_programs
    from xportbuild.stages.reference import load_reference

    references = load_reference(reference_dir)
    pte_runs = run_pte(runtime.method_step(pte_path), references)
    program = load_programs(program_dir)["forward"]
    numbers = measure(pte_runs, causal_lm.module_step(program.module()), references)
    eager_quality = program_dir / EAGER_QUALITY_FILE
    if eager_quality.is_file():  # quantized recipes: where the loss starts
        numbers["quality_by_stage"] = {"quantized eager": json.loads(eager_quality.read_text()),
                                       **numbers["quality_by_stage"]}
    failures = judge(numbers, tolerances)
    if runner is not None:
        eos_ids = json.loads((program_dir / MODEL_FACTS_FILE).read_text())["runner"]["get_eos_ids"]
        numbers["runner"] = runner_check(pte_path, runner, numbers["greedy"][0]["pte"], eos_ids)
        if numbers["runner"]["matches_pte_greedy"] is None:  # an app could not run what we would publish
            failures.append(Missed(f"ExecuTorch's LLM runner could not run the .pte on prompt 0: "
                                   f"{numbers['runner']['error']}", "", "", 0.0))
        elif numbers["runner"]["matches_pte_greedy"] is False:
            failures.append(Missed(f"ExecuTorch's LLM runner generated {numbers['runner']['text']!r} from prompt "
                                   f"0, not the .pte's greedy {numbers['runner']['expected']!r}", "", "", 0.0))
    if failures:
        raise fail(target, failures, numbers, pte_path)
    return numbers


def _outcome_row(pte, program, reference) -> dict:
    """Where the .pte's outcome (generated tokens or predicted labels) departs from the program's and the float
    model's, and by how much the program preferred its own choice there."""
    at = first_divergence(pte.tokens, program.tokens)
    margin = None
    if at is not None and at < min(len(pte.tokens), len(program.tokens)):
        scores = program.scores[at]
        margin = float(scores[program.tokens[at]] - scores[pte.tokens[at]])
    return {"pte": pte.tokens, "program": program.tokens, "reference": reference.tokens,
            "diverges_from_program_at": at, "program_margin_at_divergence": margin,
            "lengths_differ": len(pte.tokens) != len(program.tokens),
            "diverges_from_reference_at": first_divergence(pte.tokens, reference.tokens)}


def measure_methods(pte_call, program_call, samples: list, task: str, facts: dict, max_new_tokens: int) -> dict:
    """Every method replayed on the float model's recorded calls (against the float outputs and the program's),
    then the app's whole chain run with the .pte and with the program."""
    from xportbuild.models.kinds import kind_of
    from xportbuild.models.methods import replay
    from xportbuild.quality import method_quality

    kind = kind_of(task)
    methods = set(kind.methods)
    pte_outputs, program_outputs = replay(pte_call, samples, methods), replay(program_call, samples, methods)
    recorded = [[(method, output) for method, _, output in sample.calls] for sample in samples]

    def paired(outputs):
        return [[(method, output) for (method, _, _), output in zip(sample.calls, row)]
                for sample, row in zip(samples, outputs)]

    vs_reference = method_quality(pte_outputs, recorded, kind.logit_methods)
    vs_program = method_quality(pte_outputs, paired(program_outputs), kind.logit_methods)
    program_vs_reference = method_quality(program_outputs, recorded, kind.logit_methods)
    outcomes, seconds = [], 0.0
    wrapper = kind.wrapper()
    for sample in samples:
        started = time.perf_counter()
        pte = wrapper.run(pte_call, sample.inputs, facts, max_new_tokens)
        seconds += time.perf_counter() - started
        program = wrapper.run(program_call, sample.inputs, facts, max_new_tokens)
        outcomes.append(_outcome_row(pte, program, sample.outcome))
    stages = {"program": merge(list(program_vs_reference.values())), ".pte": merge(list(vs_reference.values()))}
    for name, key in (("program", "program"), (".pte", "pte")):
        stages[name]["greedy_departs_at"] = [first_divergence(o[key], o["reference"]) for o in outcomes]
    return {"methods": {method: {"vs_reference": vs_reference[method], "vs_program": vs_program[method],
                                 "program_vs_reference": program_vs_reference[method]} for method in vs_reference},
            "greedy": outcomes, "quality_by_stage": stages, "seconds_per_sample": seconds / max(len(samples), 1)}


def judge_methods(numbers: dict, tolerances: Tolerances) -> list[Missed]:
    """Every threshold a method misses, and every outcome of the .pte that departs from the program's beyond a tie."""
    failures = []
    for method, compared in numbers["methods"].items():
        checks = threshold_checks(compared["vs_reference"], compared["vs_program"], tolerances)
        failures += [dataclasses.replace(failure, text=f"method {method}: {failure.text}") for failure in missed(checks)]
    for index, item in enumerate(numbers["greedy"]):
        margin = item["program_margin_at_divergence"]
        if margin is not None and margin > tolerances.greedy_tie_margin or margin is None and item["lengths_differ"]:
            margin = float("nan") if margin is None else margin
            failures.append(Missed(f"sample {index}: the .pte's outcome {item['pte']} differs from the program's "
                                   f"{item['program']} at {item['diverges_from_program_at']}, where the program "
                                   f"prefers its choice by {margin:.3g} (allowed tie margin "
                                   f"{tolerances.greedy_tie_margin:g})", "greedy_tie_margin", "<=",
                                   accepting(margin, "<=")))
    return failures


def verify_methods(pte_path: Path, program_dirs: list[Path], reference_dir: Path, tolerances: Tolerances, target: str,
                   task: str, max_new_tokens: int) -> dict:
    """A multi-method kind's .pte against its programs and the float reference; raises VerifyFailed."""
    from xportbuild import runtime
    from xportbuild.models.methods import load_samples, program_call
    from xportbuild.stages.program import MODEL_FACTS_FILE, load_target_programs

    programs = load_target_programs(program_dirs)
    facts = json.loads((program_dirs[0] / MODEL_FACTS_FILE).read_text())["runner"]
    numbers = measure_methods(runtime.pte_call(pte_path), program_call(programs), load_samples(reference_dir), task,
                              facts, max_new_tokens)
    eager = {}
    for folder in program_dirs:
        if (folder / EAGER_QUALITY_FILE).is_file():
            eager.update(json.loads((folder / EAGER_QUALITY_FILE).read_text()))
    if eager:  # quantized methods: where the loss starts
        numbers["quality_by_stage"] = {"quantized eager": {**merge(list(eager.values())), "greedy_departs_at": []},
                                       **numbers["quality_by_stage"]}
    if failures := judge_methods(numbers, tolerances):
        raise fail(target, failures, numbers, pte_path)
    return numbers


def run(node, inputs: dict[str, Path], out_dir: Path, workspace) -> dict:
    from xportbuild.stages.lower import PTE_FILE

    if node.params["task"] != "causal-lm":
        from xportbuild.stages.program import program_inputs

        numbers = verify_methods(inputs["lower"] / PTE_FILE, list(program_inputs(inputs).values()), inputs["reference"],
                                 Tolerances(**node.params["tolerances"]), node.subject, node.params["task"],
                                 node.params["max_new_tokens"])
        return _write(numbers, out_dir)

    tolerances = Tolerances(**node.params["tolerances"])
    prompt = json.loads((inputs["reference"] / "texts.json").read_text())[0]["prompt"]
    numbers = verify(inputs["lower"] / PTE_FILE, inputs["program"], inputs["reference"], tolerances, node.subject,
                     RunnerInputs(inputs["fetch"], prompt))
    return _write(numbers, out_dir)


def _write(numbers: dict, out_dir: Path) -> dict:
    """verification.json, with the machine that measured it: the same .pte's numbers differ by CPU in their
    last bits, and a shared cache may serve them elsewhere."""
    from xportbuild.runtime import machine

    numbers["machine"] = machine()
    (out_dir / "verification.json").write_text(json.dumps(numbers, indent=1))
    return numbers
