"""Tiny random-weight decoders of every family the installed transformers loads as a causal LM, each made from the
family's own config class with its sizes shrunk (the family's own structure kept: experts, convolutions, norms)."""

from __future__ import annotations

from pathlib import Path

# Config fields a family may have, and the tiny value each gets; a field a family does not have is left alone.
TINY_SIZES = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 256, "num_experts": 4,
    "num_local_experts": 4, "n_routed_experts": 4, "moe_intermediate_size": 32, "num_experts_per_tok": 2,
    "shared_expert_intermediate_size": 32, "ffn_dim": 96, "n_inner": 96, "pad_token_id": 0, "bos_token_id": 1,
    "eos_token_id": 2, "tie_word_embeddings": False, "use_cache": True, "rotary_dim": 16,
    # multi-head latent attention (DeepSeek V3, MiniCPM3)
    "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 32, "kv_lora_rank": 32, "q_lora_rank": 32,
}
# Multi-query families (Falcon, GPT-BigCode) cache one key/value head: one for all. DiffLlama splits its heads in two.
# LFM2 as shipped mixes short convolutions with attention; its default config is attention only.
FAMILY_SIZES = {"diffllama": {"num_key_value_heads": 2}, "deepseek_v3": {"head_dim": 16},  # rotary part only
                "lfm2": {"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1]}}
# Families of the sweep refused for a cause their config shows (models/causal_lm.py, export_blocker): what validate says.
DERIVED_REFUSALS = {"lfm2": "its cache layers are LinearAttentionLayer",
                    "deepseek_v3": "its multi-head latent attention caches keys qk_nope_head_dim + qk_rope_head_dim"}
SLIDING_WINDOW = 16  # under max_seq_len, so a family's sliding-window layers do slide in verification


def tiny_config(model_type: str, layers: int = 2):
    """The family's default config with every size it has shrunk to TINY_SIZES, with `layers` decoder layers."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    for name, value in {**TINY_SIZES, "num_hidden_layers": layers, **FAMILY_SIZES.get(model_type, {})}.items():
        if hasattr(config, name) or name in getattr(config, "attribute_map", {}):
            try:
                setattr(config, name, value)
            except AttributeError:  # derived from other sizes (e.g. Falcon's head_dim): follows them
                pass
    if hasattr(config, "attention_types"):  # GPT-Neo: [[layer pattern, repeats]] must cover the layers
        config.attention_types = [[["global", "local"], config.num_hidden_layers // 2]]
        config.attention_layers = config.expand_attention_types_params(config.attention_types)
    if getattr(config, "sliding_window", None) is not None:
        config.sliding_window = SLIDING_WINDOW
    if getattr(config, "layer_types", None) is not None:  # one entry per layer, each kind of layer kept
        kinds = list(dict.fromkeys(config.layer_types))
        config.layer_types = (kinds * config.num_hidden_layers)[: config.num_hidden_layers]
    return config


def _layer_kinds(config) -> int:
    """How many kinds of layer the config's per-layer pattern names (sliding/full attention, convolution...)."""
    pattern = getattr(config, "layer_types", None) or getattr(config, "attention_layers", None) or []
    return len(set(pattern))


def _layer_signature(layer) -> list:
    return [(name, type(module).__name__) for name, module in layer.named_modules()] + \
        [(name, tuple(parameter.shape)) for name, parameter in layer.named_parameters()]


def fewest_layers(model_type: str) -> int:
    """One layer when a tiny model's two layers are alike (same modules, same kind), else two: each lowering
    costs seconds per layer, and a second layer like the first tests nothing more."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, layers=2)
    if _layer_kinds(config) > 1:
        return 2
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    stacks = [module for module in model.modules() if isinstance(module, torch.nn.ModuleList) and len(module) == 2]
    return 1 if stacks and _layer_signature(stacks[0][0]) == _layer_signature(stacks[0][1]) else 2


def save_family_model(folder: Path, model_type: str, seed: int = 0) -> Path:
    """A random tiny causal LM of `model_type` with the tests' tokenizer, saved with save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny import save_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder)
    config = tiny_config(model_type, fewest_layers(model_type))
    # As many rows as the tokenizer has tokens: the C++ runner cannot pick a token its tokenizer does not know.
    config.vocab_size = len(AutoTokenizer.from_pretrained(folder))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random tiny weights give near-uniform logits: scale the head so greedy has no ties
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(folder)
    return folder

# The families the sweep builds (tests/integration/test_families.py), those most likely to break first. Left out: qwen2,
# whose folder transformers always tokenizes with Qwen2's byte-level class, which the tests' tokenizer is not (its
# .pte matched the float model; ExecuTorch's C++ tokenizer split the prompt differently from transformers').
SWEEP = [
    "gpt2", "opt", "falcon", "mixtral", "qwen3_moe", "olmoe", "lfm2", "gpt_bigcode", "mpt", "codegen", "gptj",
    "gpt_neo", "biogpt", "xglm", "bloom", "deepseek_v3", "gemma2", "gemma3_text", "cohere2", "olmo3", "ministral",
    "vaultgemma", "exaone4", "llama", "mistral", "qwen3", "gemma", "phi", "phi3", "olmo", "olmo2",
    "granite", "smollm3", "cohere", "gpt_neox", "stablelm", "starcoder2", "helium", "glm", "glm4", "nemotron",
    "ernie4_5", "seed_oss", "apertus", "arcee", "bitnet", "diffllama", "doge",
]
