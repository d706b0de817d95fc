"""Masked LM (fill-mask) kind: `forward(input_ids, attention_mask) -> logits`, sequence length dynamic.

An app fills masks by taking the top token at each masked position; verify compares the top token at every
position, which covers the masks wherever they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from xportbuild.models.common import load_pretrained, text_limit
from xportbuild.models.methods import Call, ExportableMethod, Outcome, token_sequence_method
from xportbuild.recipe.spec import STOCK_OPS, ExportSpec, VerifyInputs

MASK = "<mask>"  # written in verify prompts; replaced by the tokenizer's own mask token

WHAT = "masked LM"  # in messages: "cannot load <folder> as a <WHAT>"


class MaskedLMForward(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def auto_class(model_dir: Path):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM


def load_model(model_dir: Path):
    return load_pretrained(auto_class(model_dir), model_dir, WHAT)


def exportables(model, max_seq_len: int, export: ExportSpec = STOCK_OPS) -> dict[str, ExportableMethod]:
    text_limit(model, max_seq_len)
    return {"forward": token_sequence_method(MaskedLMForward(model), max_seq_len)}


def samples(model_dir: Path, model, verify: VerifyInputs) -> list[dict[str, np.ndarray]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    encoded = [tokenizer(prompt.replace(MASK, tokenizer.mask_token or MASK), return_tensors="np")
               for prompt in verify.prompts]
    return [{"input_ids": e["input_ids"].astype(np.int64), "attention_mask": e["attention_mask"].astype(np.int64)}
            for e in encoded]


def run(call: Call, sample: dict[str, np.ndarray], facts: dict, max_new_tokens: int,
        forced: list[int] | None = None) -> Outcome:
    logits = call("forward", (torch.from_numpy(sample["input_ids"]), torch.from_numpy(sample["attention_mask"])))
    scores = logits[0].float().numpy()
    return Outcome(scores.argmax(-1).tolist(), list(scores))


def metadata(model, model_dir: Path, max_seq_len: int, export: ExportSpec = STOCK_OPS) -> dict:
    config = model.config
    return {"get_max_seq_len": max_seq_len, "get_vocab_size": config.vocab_size,
            "get_mask_token_id": _mask_id(model_dir)}


def _mask_id(model_dir: Path) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    return int(tokenizer.mask_token_id) if tokenizer.mask_token_id is not None else -1
