"""Reference stage: the float eager model run as an app runs it, on the verification prompts or generated inputs.

Its outcome (greedy tokens or predicted labels) is the reference text. The calls of its forced run (fed its own
outcome) are recorded, inputs and outputs, so that later stages replay each method on exactly these inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xportbuild.console import progress
from xportbuild.errors import StageError
from xportbuild.models.kinds import Kind, kind_of
from xportbuild.quality import one_thread
from xportbuild.recipe.spec import VerifyInputs

TEXTS_FILE = "texts.json"  # the kinds with a `texts` hook: prompts and the float model's text


def reference(model_dir: Path, task: str, verify: VerifyInputs, max_seq_len: int, out_dir: Path) -> dict:
    from xportbuild.models.methods import Outcome, RecordedSample, Recorder, module_call, save_samples, stored

    kind = kind_of(task)
    wrapper = kind.wrapper()
    model = wrapper.load_model(model_dir)
    exportables = wrapper.exportables(model, max_seq_len)
    call = module_call({method: exportable.module for method, exportable in exportables.items()})
    facts = wrapper.metadata(model, model_dir, max_seq_len)
    recorded = []
    with one_thread():  # stored, so hashed into downstream keys: the same bytes whatever the thread count
        samples = wrapper.samples(model_dir, model, verify)
        for index, sample in enumerate(progress(samples, desc="the float model on its samples", unit="sample")):
            _check_length(kind, index, sample, verify.max_new_tokens, max_seq_len)
            outcome = wrapper.run(call, sample, facts, verify.max_new_tokens)
            recorder = Recorder(call)
            wrapper.run(recorder, sample, facts, verify.max_new_tokens, forced=outcome.tokens)
            calls = stored(recorder.calls, kind.logit_methods, kind.reference_logits)
            recorded.append(RecordedSample(sample, Outcome(outcome.tokens), calls))
    save_samples(recorded, out_dir)
    positions = sum(output.reshape(-1, output.shape[-1]).shape[0] for sample in recorded
                    for method, _, output in sample.calls if method in kind.logit_methods)
    result = {"samples": len(recorded), "positions": positions, "outcomes": [s.outcome.tokens for s in recorded]}
    if hasattr(wrapper, "texts"):
        result["texts"] = wrapper.texts(model_dir, verify, [sample.outcome for sample in recorded])
        (out_dir / TEXTS_FILE).write_text(json.dumps(result["texts"], indent=1))
    return result


def _check_length(kind: Kind, index: int, sample: dict[str, np.ndarray], max_new_tokens: int, max_seq_len: int) -> None:
    """Token ids must fit the sequence length the methods are exported with (images and audio have fixed shapes),
    with room for the generated tokens where they follow the prompt."""
    generated = max_new_tokens if kind.prompt_continued else 0
    for name, value in sample.items():
        if value.dtype == np.int64 and value.shape[-1] + generated > max_seq_len:
            also = f"; with max_new_tokens={max_new_tokens} it exceeds" if generated else ", more than"
            raise StageError(f"verify prompt {index} has {value.shape[-1]} tokens ({name}){also} max_seq_len="
                             f"{max_seq_len}: shorten it or raise max_seq_len")


def run(node, inputs: dict[str, Path], out_dir: Path, workspace) -> dict:
    verify = VerifyInputs(**{**node.params["verify"], "prompts": tuple(node.params["verify"]["prompts"])})
    return reference(inputs["fetch"], node.params["task"], verify, node.params["max_seq_len"], out_dir)
