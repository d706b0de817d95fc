"""Verify stage: the .pte in the ExecuTorch runtime against the program it came from and the float reference."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from xportbuild.errors import VerifyFailed
from xportbuild.quality import compare_logits, first_divergence, merge
from xportbuild.recipe.spec import Tolerances

# Written by the quantize stage: the quantized eager model's quality, before export and lowering.
EAGER_QUALITY_FILE = "eager_quality.json"


def _margin(program_step, prompt: list[int], pte_tokens: list[int], program_tokens: list[int], at: int | None):
    """How much the program prefers its own token over the .pte's where they first differ (logits)."""
    if at is None:
        return None
    from xportbuild.models import causal_lm

    logits = causal_lm.teacher_forced_logits(program_step, prompt, program_tokens[: at + 1])[-1]
    return float(logits[program_tokens[at]] - logits[pte_tokens[at]])


def measure(pte_step, program_step, references: list[dict]) -> dict:
    """All numbers verify judges, for the `forward` method of a causal LM."""
    from xportbuild.models import causal_lm

    vs_reference, vs_program, program_vs_reference, greedy, decode_seconds, decoded = [], [], [], [], 0.0, 0
    for ref in references:
        prompt, continuation = ref["prompt"].tolist(), ref["greedy"].tolist()
        pte_logits = causal_lm.teacher_forced_logits(pte_step, prompt, continuation)
        program_logits = causal_lm.teacher_forced_logits(program_step, prompt, continuation)
        vs_reference.append(compare_logits(pte_logits, ref["logits"]))
        vs_program.append(compare_logits(pte_logits, program_logits))
        program_vs_reference.append(compare_logits(program_logits, ref["logits"]))
        started = time.perf_counter()
        pte_tokens = causal_lm.greedy(pte_step, prompt, len(continuation))
        decode_seconds += time.perf_counter() - started
        decoded += len(pte_tokens)
        program_tokens = causal_lm.greedy(program_step, prompt, len(continuation))
        at = first_divergence(pte_tokens, program_tokens)
        greedy.append({"pte": pte_tokens, "program": program_tokens, "reference": continuation,
                       "diverges_from_program_at": at,
                       "program_margin_at_divergence": _margin(program_step, prompt, pte_tokens, program_tokens, at),
                       "diverges_from_reference_at": first_divergence(pte_tokens, continuation)})
    departures = {"program": [g["program"] for g in greedy], ".pte": [g["pte"] for g in greedy]}
    stages = {"program": merge(program_vs_reference), ".pte": merge(vs_reference)}
    for name, tokens in departures.items():
        stages[name]["greedy_departs_at"] = [first_divergence(t, g["reference"]) for t, g in zip(tokens, greedy)]
    return {"vs_reference": merge(vs_reference), "vs_program": merge(vs_program), "greedy": greedy,
            "quality_by_stage": stages, "generate_tokens_per_s": decoded / decode_seconds if decode_seconds else None}


def missed(checks: list[tuple[str, float, str, float]]) -> list[str]:
    """The (name, value, ">=" or "<=", limit) checks that fail, as readable lines."""
    return [f"{name} {value:.6g} (required {op} {limit:g})" for name, value, op, limit in checks
            if not (value >= limit if op == ">=" else value <= limit)]


def threshold_checks(ref: dict, prog: dict, tolerances: Tolerances) -> list[tuple[str, float, str, float]]:
    """The recipe's thresholds on numbers against float (`ref`) and against the program (`prog`); top-1 and KL only
    where the outputs are scores (logits), not hidden states."""
    checks = [("vs float: mean cosine", ref["cosine_mean"], ">=", tolerances.min_cosine)]
    if "top1" in ref:
        checks.append(("vs float: top-1 agreement", ref["top1"], ">=", tolerances.min_top1))
    checks.append(("vs float: max abs error", ref["max_abs"], "<=", tolerances.max_abs))
    if "kl_mean" in ref:
        checks.append(("vs float: mean KL divergence", ref["kl_mean"], "<=", tolerances.max_kl))
    return checks + [("vs program: min cosine", prog["cosine_min"], ">=", tolerances.min_cosine_vs_program),
                     ("vs program: max abs error", prog["max_abs"], "<=", tolerances.max_abs_vs_program)]


def judge(numbers: dict, tolerances: Tolerances) -> list[str]:
    """Every threshold the numbers miss, as readable lines."""
    failures = missed(threshold_checks(numbers["vs_reference"], numbers["vs_program"], tolerances))
    for index, item in enumerate(numbers["greedy"]):
        margin = item["program_margin_at_divergence"]
        if margin is not None and margin > tolerances.greedy_tie_margin:
            failures.append(f"prompt {index}: greedy tokens of the .pte differ from the program's at token "
                            f"{item['diverges_from_program_at']}, where the program prefers its token by "
                            f"{margin:.3g} logits (allowed tie margin {tolerances.greedy_tie_margin:g})")
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
    except RuntimeError as err:  # e.g. a tokenizer.json the C++ tokenizer cannot read: reported, the .pte is fine
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

    program = load_programs(program_dir)["forward"]
    numbers = measure(runtime.method_step(pte_path), causal_lm.module_step(program.module()),
                      load_reference(reference_dir))
    eager_quality = program_dir / EAGER_QUALITY_FILE
    if eager_quality.is_file():  # quantized recipes: where the loss starts
        numbers["quality_by_stage"] = {"quantized eager": json.loads(eager_quality.read_text()),
                                       **numbers["quality_by_stage"]}
    failures = judge(numbers, tolerances)
    if runner is not None:
        eos_ids = json.loads((program_dir / MODEL_FACTS_FILE).read_text())["runner"]["get_eos_ids"]
        numbers["runner"] = runner_check(pte_path, runner, numbers["greedy"][0]["pte"], eos_ids)
        if numbers["runner"]["matches_pte_greedy"] is False:
            failures.append(f"ExecuTorch's LLM runner generated {numbers['runner']['text']!r} from prompt 0, not "
                            f"the .pte's greedy {numbers['runner']['expected']!r}")
    if failures:
        raise VerifyFailed(target, failures, numbers)
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


def judge_methods(numbers: dict, tolerances: Tolerances) -> list[str]:
    """Every threshold a method misses, and every outcome of the .pte that departs from the program's beyond a tie."""
    failures = []
    for method, compared in numbers["methods"].items():
        checks = threshold_checks(compared["vs_reference"], compared["vs_program"], tolerances)
        failures += [f"method {method}: {failure}" for failure in missed(checks)]
    for index, item in enumerate(numbers["greedy"]):
        margin = item["program_margin_at_divergence"]
        if margin is not None and margin > tolerances.greedy_tie_margin or margin is None and item["lengths_differ"]:
            margin = float("nan") if margin is None else margin
            failures.append(f"sample {index}: the .pte's outcome {item['pte']} differs from the program's "
                            f"{item['program']} at {item['diverges_from_program_at']}, where the program prefers "
                            f"its choice by {margin:.3g} (allowed tie margin {tolerances.greedy_tie_margin:g})")
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
        raise VerifyFailed(target, failures, numbers)
    return numbers


def run(node, inputs: dict[str, Path], out_dir: Path, workspace) -> dict:
    from xportbuild.stages.lower import PTE_FILE

    if node.params["task"] != "causal-lm":
        from xportbuild.stages.program import program_inputs

        numbers = verify_methods(inputs["lower"] / PTE_FILE, list(program_inputs(inputs).values()), inputs["reference"],
                                 Tolerances(**node.params["tolerances"]), node.subject, node.params["task"],
                                 node.params["max_new_tokens"])
        (out_dir / "verification.json").write_text(json.dumps(numbers, indent=1))
        return numbers

    tolerances = Tolerances(**node.params["tolerances"])
    prompt = json.loads((inputs["reference"] / "texts.json").read_text())[0]["prompt"]
    numbers = verify(inputs["lower"] / PTE_FILE, inputs["program"], inputs["reference"], tolerances, node.subject,
                     RunnerInputs(inputs["fetch"], prompt))
    (out_dir / "verification.json").write_text(json.dumps(numbers, indent=1))
    return numbers
