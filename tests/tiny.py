"""Tiny models, tokenizers, an offline HF cache and a GGUF, all built locally from configs."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

WORDS = ("the capital of france is paris water boils at a temperature degrees hello world one two three "
         "four five six seven eight nine ten and or not def return if else for in while model export cache").split()
MAX_POSITIONS = 256


def save_tokenizer(folder: Path) -> None:
    """A BPE tokenizer laid out like Gemma's (spaces as "▁", no pre-tokenizer split), which ExecuTorch's C++
    tokenizer reads too; trained on WORDS, special tokens first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                  show_progress=False)
    backend.train_from_iterator([" ".join(WORDS), *(f" {word}" for word in WORDS)], trainer)
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
        # head_dim 48 is not hidden / heads (32): runner metadata must read it from the config, as for Gemma 3.
        return Gemma3TextConfig(**common, head_dim=48, sliding_window=64, query_pre_attn_scalar=48,
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
    if arch == "gemma3":
        # Like Gemma 3: bfloat16 weights (exported as float32) and a second end-of-turn id in generation_config.
        model.generation_config.eos_token_id = [2, 7]
        model.to(torch.bfloat16)
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


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_tensor_name(name: str) -> str:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    _, _, index, rest = name.split(".", 3)
    module = rest.rsplit(".", 1)[0]
    return f"blk.{index}.{_GGUF_LAYER_NAMES[module]}.weight"


def save_gguf(path: Path, seed: int = 1) -> Path:
    """A tiny float32 llama GGUF with a llama (sentencepiece-style) vocabulary."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config("llama", tie=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(MAX_POSITIONS)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    pieces = sorted({c for w in WORDS for c in w} | {"\u2581"})
    tokens = ["<unk>", "<s>", "</s>"] + pieces + [f"\u2581{w}" for w in WORDS]
    tokens += [f"<extra_{i}>" for i in range(config.vocab_size - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 3 + [-float(i) for i in range(len(tokens) - 3)])
    writer.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    for name, tensor in model.state_dict().items():
        writer.add_tensor(_gguf_tensor_name(name), tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def save_foreign_gguf(path: Path, architecture: str) -> Path:
    """A small GGUF of an architecture transformers cannot convert."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(MAX_POSITIONS)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def save_image_classifier(folder: Path) -> Path:
    """A tiny ViT: a real, loadable model that is not a causal LM."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=3)
    ViTForImageClassification(config).save_pretrained(folder)
    return folder
