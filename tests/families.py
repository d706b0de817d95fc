"""Tiny random-weight decoders of every family the installed transformers loads as a causal LM, each made from the
family's own config class with its sizes shrunk (the family's own structure kept: experts, convolutions, norms)."""

from __future__ import annotations

from pathlib import Path

# Config fields a family may have, and the tiny value each gets; a field a family does not have is left alone.
TINY_SIZES = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 256, "num_experts": 4,
    "num_local_experts": 4, "n_routed_experts": 4, "moe_intermediate_size": 32, "num_experts_per_tok": 2,
    "shared_expert_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32, "ffn_dim": 96, "n_inner": 96,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "use_cache": True,
    "rotary_dim": 16, "n_group": 1, "topk_group": 1,  # expert groups: all experts in one
    # multi-head latent attention (DeepSeek V3, MiniCPM3)
    "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 32, "kv_lora_rank": 32, "q_lora_rank": 32,
    # state-space layers (Mamba 1 and 2 and their hybrids): heads x head dim = expand x hidden = 128
    "state_size": 16, "ssm_state_size": 16, "mamba_d_state": 16, "expand": 2, "mamba_expand": 2, "num_heads": 4,
    "mamba_n_heads": 4, "mamba_num_heads": 4, "n_mamba_heads": 4, "mamba_d_head": 32, "mamba_head_dim": 32,
    "mamba_headdim": 32, "n_groups": 1, "mamba_n_groups": 1, "mamba_ngroups": 1, "time_step_rank": 8,
    "mamba_dt_rank": 8, "mamba_d_ssm": 128, "chunk_size": 16, "mamba_chunk_size": 16,
    "attention_hidden_size": 128, "attention_head_dim": 64,  # Zamba: attention over [hidden, hidden] concatenated
    # linear attention (gated delta rule, Kimi delta attention, short convolutions)
    "linear_num_heads": 2, "linear_head_dim": 32, "linear_num_key_heads": 1, "linear_num_value_heads": 2,
    "linear_key_head_dim": 32, "linear_value_head_dim": 32, "swa_num_attention_heads": 2,
    "swa_num_key_value_heads": 1, "swa_head_dim": 32,
    # hybrids that place attention by period (Jamba, Zamba) or by index (Bamba): one layer of each kind
    "attn_layer_period": 2, "attn_layer_offset": 1, "attn_layer_indices": [1],
}
# Multi-query families (Falcon, GPT-BigCode) cache one key/value head: one for all. DiffLlama splits its heads in two.
# LFM2 as shipped mixes short convolutions with attention; its default config is attention only.
FAMILY_SIZES = {"diffllama": {"num_key_value_heads": 2},
                "lfm2": {"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1]},
                "zaya": {"num_experts_per_tok": 1},  # the only routing it has
                "zamba2": {"hybrid_layer_ids": [1]},  # derived from its layer pattern before the pattern is set
                # Hybrids whose default layer pattern starts with more state layers than a tiny model has.
                "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
                "recurrent_gemma": {"block_types": ["recurrent", "attention"]}}
# Families of the sweep refused for a cause their config shows (models/causal_lm.py, export_blocker): what validate says.
DERIVED_REFUSALS = {"deepseek_v3": "its multi-head latent attention caches keys qk_nope_head_dim + qk_rope_head_dim"}
SLIDING_WINDOW = 16  # under max_seq_len, so a family's sliding-window layers do slide in verification


def tiny_config(model_type: str, layers: int = 2):
    """The family's default config with every size it has shrunk to TINY_SIZES, with `layers` decoder layers (more
    when its layer pattern has more kinds of layer: one of each is kept)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    default = CONFIG_MAPPING[model_type]()
    sizes = {**TINY_SIZES, "num_hidden_layers": layers, **FAMILY_SIZES.get(model_type, {})}
    overrides = {name: value for name, value in sizes.items()
                 if hasattr(default, name) or name in getattr(default, "attribute_map", {})}
    if getattr(default, "head_dim", None) is not None and default.head_dim == getattr(default, "qk_rope_head_dim", None):
        overrides["head_dim"] = overrides["qk_rope_head_dim"]  # latent attention whose head_dim is its rotary part
    for name in ("layer_types", "mlp_layer_types"):  # one entry per layer, each kind of layer kept
        if isinstance(getattr(default, name, None), list) and name not in FAMILY_SIZES.get(model_type, {}):
            kinds = list(dict.fromkeys(getattr(default, name)))
            count = max(layers, len(kinds))
            overrides.update({name: (kinds * count)[:count], "num_hidden_layers": count})
    try:  # made with the sizes, so what the family derives from them (head widths, per-layer lists) follows
        config = type(default)(**overrides)
    except Exception:  # noqa: BLE001  a size it only derives, or a check of the whole: set one by one instead
        config = _set_one_by_one(default, overrides)
    if hasattr(config, "attention_types"):  # GPT-Neo: [[layer pattern, repeats]] must cover the layers
        config.attention_types = [[["global", "local"], config.num_hidden_layers // 2]]
        config.attention_layers = config.expand_attention_types_params(config.attention_types)
    if getattr(config, "sliding_window", None) is not None:
        config.sliding_window = SLIDING_WINDOW
    return config


def _set_one_by_one(config, overrides: dict):
    for name, value in overrides.items():
        try:
            setattr(config, name, value)
        except AttributeError:  # derived from other sizes (e.g. Falcon's head_dim, Jamba's layer pattern): follows them
            pass
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


def _tokenizes_as_saved(folder: Path) -> bool:
    """Whether transformers reads the folder's tokenizer as its tokenizer.json says (ExecuTorch's C++ tokenizer
    reads that file), not with a class the family's model type brings."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    text = "the capital of france is hello world"
    saved = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    return AutoTokenizer.from_pretrained(folder)(text).input_ids == saved(text).input_ids


def save_family_model(folder: Path, model_type: str, seed: int = 0) -> Path:
    """A random tiny causal LM of `model_type` with the tests' tokenizer, saved with save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny import save_byte_level_tokenizer, save_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(model_type, fewest_layers(model_type))
    config.save_pretrained(folder)
    save_tokenizer(folder)
    if not _tokenizes_as_saved(folder):  # transformers picks its own byte-level class for this family (qwen2)
        save_byte_level_tokenizer(folder)
    # As many rows as the tokenizer has tokens: the C++ runner cannot pick a token its tokenizer does not know.
    config.vocab_size = len(AutoTokenizer.from_pretrained(folder))
    if getattr(config, "unpadded_vocab_size", None):  # the head's rows (Inkling 2): as many
        config.unpadded_vocab_size = config.vocab_size
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random tiny weights give near-uniform logits: scale the head so greedy has no ties
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(folder)
    return folder

# The families the sweep builds (tests/integration/test_families.py), those most likely to break first; the state
# families last, one of each kind of state: short convolutions (lfm2), gated delta rule (qwen3_next), Mamba 2 beside
# attention (nemotron_h) and alone (mamba2).
SWEEP = [
    "gpt2", "opt", "falcon", "mixtral", "qwen3_moe", "olmoe", "lfm2", "gpt_bigcode", "mpt", "codegen", "gptj",
    "gpt_neo", "biogpt", "xglm", "bloom", "deepseek_v3", "gemma2", "gemma3_text", "cohere2", "olmo3", "ministral",
    "vaultgemma", "exaone4", "llama", "mistral", "qwen3", "gemma", "phi", "phi3", "olmo", "olmo2",
    "granite", "smollm3", "cohere", "gpt_neox", "stablelm", "starcoder2", "helium", "glm", "glm4", "nemotron",
    "ernie4_5", "seed_oss", "apertus", "arcee", "bitnet", "diffllama", "doge", "qwen2", "mamba2", "nemotron_h",
    "qwen3_next",
]

# Every other causal-LM model type of the pinned transformers, and why the sweep does not build it. The list is
# checked against transformers' own (tests/unit/test_family_catalogue.py): a release's new family fails the tests until
# it is swept or named here, and every family named as refused must be refused by validate for that cause.
ALIKE = "builds and verifies with both recipes; left out of the sweep for the test command's time, like {}"
REFUSED = "refused by validate: "
ENCODER_DECODER = "an encoder-decoder: its causal-LM class is a decoder that reads an encoder's states"
MULTIMODAL = "a multimodal checkpoint: its text decoder is the family {}"
NO_DEFAULT_MODEL = "its default config builds no model in transformers 5.24 ({})"
MLA = REFUSED + "its multi-head latent attention caches keys qk_nope_head_dim + qk_rope_head_dim"
ENCODER = REFUSED + "its config is an encoder's (is_decoder = false)"
ZERO_STATE_SCAN = REFUSED + "its sequence scan mamba_selective_scan (modeling_{}.py) starts from a zero state"
LEFT_OUT = {
    **{family: ALIKE.format("mixtral, qwen3_moe, olmoe (mixture of experts)") for family in (
        "afmoe", "cohere2_moe", "ernie4_5_moe", "exaone_moe", "flex_olmo", "glm4_moe", "gpt_oss", "granitemoe",
        "granitemoe_swa", "granitemoeshared", "hunyuan_v1_moe", "jetmoe", "laguna", "minimax_m2", "minimax_m3_vl_text",
        "phimoe", "qwen2_moe", "sarvam_moe", "solar_open", "mellum", "hy_v3", "llama4_text")},
    **{family: ALIKE.format("llama, gemma2, cohere2 (dense, sliding windows)") for family in (
        "apertus1p5_text", "aria_text", "ctrl", "cwm", "exaone", "flint", "gpt-sw3", "gpt_neox_japanese",
        "granite_swa", "hunyuan_v1_dense", "hyperclovax", "internlm3", "iquestcoder", "jais2", "kolibri1",
        "ministral3", "modernbert-decoder", "moshi", "nanochat", "persimmon", "phi4_multimodal", "hrm_text", "dory")},
    **{family: ALIKE.format("lfm2, qwen3_next, nemotron_h, mamba2 (state caches)") for family in (
        "bamba", "falcon_h1", "granitemoehybrid", "inkling_text", "lara_mini", "lfm3", "olmo_hybrid", "qwen3_5_text",
        "qwen3_5_moe_text", "zamba2")},
    **{family: MLA for family in (
        "axk1", "axk2", "bailing_hybrid", "deepseek_v2", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "hy_v4",
        "kimi_linear", "longcat_flash", "minicpm3", "sarvam_mla", "youtu")},
    **{family: ENCODER for family in (
        "bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
        "reformer", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta",
        "xlm-roberta-xl", "xmod")},
    **{family: ZERO_STATE_SCAN.format(family) for family in ("mamba", "falcon_mamba", "jamba", "zamba")},
    "xlm": REFUSED + "its config is an encoder's (causal = false)",
    "minimax": REFUSED + "it keeps its state in a cache class of its own (MiniMaxCache)",
    "xlstm": REFUSED + "it keeps its state in a cache class of its own (xLSTMCache)",
    "recurrent_gemma": REFUSED + "it keeps its recurrent state in attributes of its own layers",
    "rwkv": REFUSED + "RwkvForCausalLM takes no transformers cache",
    "openai-gpt": REFUSED + "OpenAIGPTLMHeadModel takes no transformers cache",
    "blt": REFUSED + "transformers builds no static cache for it",
    "deepseek_v4": REFUSED + "transformers builds no static cache for it",
    "gemma3n_text": REFUSED + "transformers builds no static cache for it",
    **{family: ENCODER_DECODER for family in (
        "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "musicgen", "musicgen_melody",
        "mvp", "pegasus", "plbart", "prophetnet", "whisper")},
    **{family: MULTIMODAL.format(text) for family, text in {
        "dots3_note": "dots3_note_text", "emu3": "emu3's text model", "fuyu": "persimmon", "gemma3": "gemma3_text",
        "gemma3n": "gemma3n_text", "gemma4": "gemma4_text", "gemma4_unified": "gemma4_unified_text",
        "gemma4_unified_assistant": "gemma4_unified_text", "got_ocr2": "qwen2", "llama4": "llama4_text",
        "mllama": "mllama's text model", "moss_transcribe_diarize": "qwen3", "qwen3_5": "qwen3_5_text",
        "qwen3_5_moe": "qwen3_5_moe_text", "qwen4_exp": "qwen4_exp_text"}.items()},
    **{family: NO_DEFAULT_MODEL.format(error) for family, error in {
        "cohere_compass_text": "no rope parameters for its full-attention layers",
        "dbrx": "its attention config has no rope_theta", "dots1": "n_shared_experts is None", "dots3_note_text": "per-layer head counts only",
        "gemma4_text": "per-layer head sizes only", "gemma4_unified_text": "per-layer head sizes only",
        "gemma4_assistant": "its validator rejects its own hidden_size_per_layer_input",
        "lfm2_moe": "layer_types is None", "qwen4_exp_text": "token_budget and compress_ratio are None",
        "xlnet": "no max_position_embeddings: it has no sequence length limit"}.items()},
    # Export fails in the program stage with one line naming the model line and the kind of problem.
    "cpmant": "export fails: a branch on the cache's length (modeling_cpmant.py: if past_length != 0)",
    "git": "export fails: a branch on the cache's length (modeling_git.py: cache_length > 0); an image captioner",
    "trocr": "export fails: positions from an unbacked length (modeling_trocr.py: position_ids = torch.arange(...))",
    "mimo_v2_flash": "export fails: its sliding-window layers have twice the key/value heads the static cache holds",
    "zaya": "export fails: its code fixes the input length (a delayed value path over the previous token)",
    "inkling2_text": "export fails: a shape guard its code makes holds for 2 to 3 tokens only",
    "inkling2_loop_text": "export fails: a shape guard its code makes holds for 2 to 3 tokens only",
    "beam": "xnnpack-fp32 builds and verifies; xnnpack-8da8w is refused at verify on the tiny random model (top-1 "
            "agreement at most 0.81 against 0.9 required)",
}
