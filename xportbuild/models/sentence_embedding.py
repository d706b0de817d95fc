"""Sentence embeddings (feature-extraction): `forward(input_ids, attention_mask) -> embeddings [1, dim]`, the
encoder's token states pooled and normalised as the model's sentence-transformers modules say (modules.json,
1_Pooling/config.json); a folder without them is mean-pooled, as sentence-transformers does.

Verify compares the embeddings by cosine and, across the verification sentences, each one's nearest neighbour
(retrieval, what an app does with them) with the float model's (quality.neighbour_rows)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xportbuild.errors import StageError
from xportbuild.models.common import load_pretrained, text_limit
from xportbuild.models.methods import Call, ExportableMethod, Outcome, token_sequence_method
from xportbuild.recipe.spec import STOCK_OPS, ExportSpec, VerifyInputs

WHAT = "sentence encoder"  # in messages: "cannot load <folder> as a <WHAT>"
MODULES_FILE = "modules.json"
# sentence-transformers' pooling modes this kind computes, by their config key.
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}
_MODULE_TYPES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class Pooling:
    mode: str
    normalize: bool


def pooling(model_dir: Path) -> Pooling:
    """How the model's sentence-transformers modules turn token states into one vector."""
    modules_file = Path(model_dir) / MODULES_FILE
    if not modules_file.is_file():
        return Pooling("mean", False)
    modules = {module["type"].rsplit(".", 1)[-1]: module for module in json.loads(modules_file.read_text())}
    if unknown := sorted(set(modules) - set(_MODULE_TYPES)):
        raise StageError(f"{modules_file}: modules {', '.join(unknown)} are not exported (this kind computes "
                         f"{', '.join(_MODULE_TYPES)})")
    mode = "mean"
    if "Pooling" in modules:
        config_file = Path(model_dir) / modules["Pooling"]["path"] / "config.json"
        config = json.loads(config_file.read_text())
        chosen = [key for key, value in config.items() if key.startswith("pooling_mode_") and value]
        if len(chosen) != 1 or chosen[0] not in POOLING_MODES:
            raise StageError(f"{config_file}: pooling {', '.join(chosen) or 'none'}: one of "
                             f"{', '.join(POOLING_MODES)} is exported")
        mode = POOLING_MODES[chosen[0]]
    return Pooling(mode, "Normalize" in modules)


class SentenceEmbedding(torch.nn.Module):
    def __init__(self, model, how: Pooling):
        super().__init__()
        self.model, self.mode, self.normalize = model, how.mode, how.normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        if self.mode == "cls":
            pooled = states[:, 0]
        elif self.mode == "max":
            pooled = (states + (mask - 1.0) * 1e9).max(dim=1).values
        else:
            count = mask.sum(dim=1).clamp(min=1e-9)
            pooled = (states * mask).sum(dim=1) / (count.sqrt() if self.mode == "mean_sqrt_len" else count)
        return torch.nn.functional.normalize(pooled, p=2, dim=1) if self.normalize else pooled


def auto_class(model_dir: Path):
    from transformers import AutoModel

    return AutoModel


def load_model(model_dir: Path):
    return load_pretrained(auto_class(model_dir), model_dir, WHAT)


def exportables(model, max_seq_len: int, export: ExportSpec = STOCK_OPS) -> dict[str, ExportableMethod]:
    text_limit(model, max_seq_len)
    module = SentenceEmbedding(model, pooling(Path(model.name_or_path)))
    return {"forward": token_sequence_method(module, max_seq_len)}


def encode(tokenizer, text: str, max_seq_len: int | None) -> dict[str, np.ndarray]:
    """One sentence as the method takes it (cut to max_seq_len tokens, as sentence-transformers cuts; None: whole,
    as verify takes its prompts, which must fit)."""
    encoded = tokenizer(text, truncation=max_seq_len is not None, max_length=max_seq_len, return_tensors="np")
    return {"input_ids": encoded["input_ids"].astype(np.int64),
            "attention_mask": encoded["attention_mask"].astype(np.int64)}


def samples(model_dir: Path, model, verify: VerifyInputs) -> list[dict[str, np.ndarray]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    return [encode(tokenizer, prompt, None) for prompt in verify.prompts]


def run(call: Call, sample: dict[str, np.ndarray], facts: dict, max_new_tokens: int,
        forced: list[int] | None = None) -> Outcome:
    """No choice is made per sentence: what an app does with embeddings (nearest neighbours) is judged across the
    sentences (verify)."""
    call("forward", (torch.from_numpy(sample["input_ids"]), torch.from_numpy(sample["attention_mask"])))
    return Outcome([])


def metadata(model, model_dir: Path, max_seq_len: int, export: ExportSpec = STOCK_OPS) -> dict:
    how = pooling(model_dir)
    return {"get_max_seq_len": max_seq_len, "get_embedding_dim": int(model.config.hidden_size),
            "get_pooling": how.mode, "get_normalized": how.normalize}
