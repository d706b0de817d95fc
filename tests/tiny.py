"""Tiny models, tokenizers, an offline HF cache and a GGUF, all built locally from configs."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

WORDS = ("the capital of france is paris water boils at a temperature degrees hello world one two three "
         "four five six seven eight nine ten and or not def return if else for in while model export cache").split()
MAX_POSITIONS = 256


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer (special tokens first) saved as tokenizer.json + config."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        unk_token="<unk>", pad_token="<pad>")
    tokenizer.save_pretrained(folder)


def _config(arch: str, tie: bool):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=tie,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=32, sliding_window=64, query_pre_attn_scalar=32,
                                layer_types=["sliding_attention", "full_attention"])
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=32)
    return LlamaConfig(**common)


def save_model(folder: Path, arch: str = "llama", tie: bool = False, seed: int = 0) -> Path:
    """A random-weight causal LM of `arch` with its tokenizer, saved with save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, tie)).eval()
    # Random tiny weights give near-uniform logits; scale the head so greedy choices are not ties.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def populate_hub_cache(model_dir: Path, cache_dir: Path, repo_id: str, branch: str = "main") -> str:
    """Lay out `model_dir` as huggingface_hub's cache of `repo_id`; returns the commit SHA."""
    commit = hashlib.sha1(repo_id.encode() + b"tiny").hexdigest()
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in model_dir.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.name
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return commit


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
