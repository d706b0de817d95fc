"""Reference stage: the float eager model on the verification prompts -> token ids and logits (.npz).

Logits are stored as float16: hundreds of positions over a 262k vocabulary would take a gigabyte in float32, and
half precision moves a logit by at most 0.016 below 64, far under every tolerance it is compared with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xportbuild.cache import reading_entry
from xportbuild.errors import StageError
from xportbuild.quality import one_thread
from xportbuild.recipe.spec import VerifyInputs


def reference(model_dir: Path, verify: VerifyInputs, max_seq_len: int, out_dir: Path) -> dict:
    """Greedy continuations and teacher-forced logits of the float model, saved without pickle."""
    from transformers import AutoTokenizer

    from xportbuild.models import causal_lm

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    step = causal_lm.module_step(causal_lm.exportable(causal_lm.load_model(model_dir), max_seq_len))
    with one_thread():
        arrays, texts = _continue_prompts(step, tokenizer, verify, max_seq_len)
    np.savez(out_dir / "reference.npz", **arrays)
    (out_dir / "texts.json").write_text(json.dumps(texts, indent=1))
    positions = sum(len(arrays[f"prompt_{i}"]) + len(arrays[f"greedy_{i}"]) - 1 for i in range(len(texts)))
    return {"prompts": len(verify.prompts), "positions": positions, "texts": texts}


def _continue_prompts(step, tokenizer, verify: VerifyInputs, max_seq_len: int) -> tuple[dict, list[dict]]:
    """Per prompt: its ids, the float model's greedy continuation and the logits at every position."""
    from xportbuild.models import causal_lm

    arrays, texts = {}, []
    for index, prompt in enumerate(verify.prompts):
        prompt_ids = tokenizer(prompt)["input_ids"]
        if len(prompt_ids) + verify.max_new_tokens > max_seq_len:
            raise StageError(
                f"verify prompt {index} has {len(prompt_ids)} tokens; with max_new_tokens={verify.max_new_tokens} "
                f"it exceeds max_seq_len={max_seq_len}: shorten it or raise max_seq_len"
            )
        continuation = causal_lm.greedy(step, prompt_ids, verify.max_new_tokens)
        arrays[f"prompt_{index}"] = np.array(prompt_ids, dtype=np.int64)
        arrays[f"greedy_{index}"] = np.array(continuation, dtype=np.int64)
        arrays[f"logits_{index}"] = causal_lm.teacher_forced_logits(step, prompt_ids, continuation).astype(np.float16)
        texts.append({"prompt": prompt, "continuation": tokenizer.decode(continuation)})
    return arrays, texts


def load_reference(entry_dir: Path) -> list[dict[str, np.ndarray]]:
    """Per prompt: {"prompt", "greedy", "logits"} arrays."""
    with reading_entry(entry_dir), np.load(entry_dir / "reference.npz", allow_pickle=False) as data:
        count = sum(1 for name in data.files if name.startswith("prompt_"))
        return [{kind: data[f"{kind}_{i}"] for kind in ("prompt", "greedy", "logits")} for i in range(count)]


def reference_methods(model_dir: Path, task: str, verify: VerifyInputs, max_seq_len: int, out_dir: Path) -> dict:
    """The float eager model run as an app chains its methods, on generated or prompted inputs; every method call
    is recorded so that later stages can replay each method on exactly these inputs."""
    from xportbuild.models.kinds import kind_of
    from xportbuild.models.methods import RecordedSample, Recorder, module_call, save_samples

    wrapper = kind_of(task).wrapper()
    model = wrapper.load_model(model_dir)
    modules = {method: exportable.module for method, exportable in wrapper.exportables(model, max_seq_len).items()}
    facts = wrapper.metadata(model, model_dir, max_seq_len)
    recorded = []
    with one_thread():
        for index, sample in enumerate(wrapper.samples(model_dir, model, verify)):
            _check_length(index, sample, max_seq_len)
            recorder = Recorder(module_call(modules))
            outcome = wrapper.run(recorder, sample, facts, verify.max_new_tokens)
            recorded.append(RecordedSample(sample, outcome, recorder.calls))
    save_samples(recorded, out_dir)
    return {"samples": len(recorded), "outcomes": [sample.outcome.tokens for sample in recorded]}


def _check_length(index: int, sample: dict[str, np.ndarray], max_seq_len: int) -> None:
    """Token ids must fit the sequence length the methods are exported with (images and audio have fixed shapes)."""
    for name, value in sample.items():
        if value.dtype == np.int64 and value.shape[-1] > max_seq_len:
            raise StageError(f"verify prompt {index} has {value.shape[-1]} tokens ({name}), more than max_seq_len="
                             f"{max_seq_len}: shorten it or raise max_seq_len")


def run(node, inputs: dict[str, Path], out_dir: Path, workspace) -> dict:
    verify = VerifyInputs(**{**node.params["verify"], "prompts": tuple(node.params["verify"]["prompts"])})
    if node.params["task"] != "causal-lm":
        return reference_methods(inputs["fetch"], node.params["task"], verify, node.params["max_seq_len"], out_dir)
    return reference(inputs["fetch"], verify, node.params["max_seq_len"], out_dir)
