"""Tiny models, tokenizers, an offline HF cache and a GGUF, all built locally from configs."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

WORDS = ("the capital of france is paris water boils at a temperature degrees hello world one two three "
         "four five six seven eight nine ten and or not def return if else for in while model export cache").split()
MAX_POSITIONS = 256


def save_tokenizer(folder: Path, mask: bool = False) -> None:
    """A BPE tokenizer laid out like Gemma's (spaces as "▁", no pre-tokenizer split), which ExecuTorch's C++
    tokenizer reads too; trained on WORDS, special tokens first (with `mask`, a "<mask>" token for masked LMs and
    an end token after each text, as encoders expect)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"] + (["<mask>"] if mask else [])
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=specials, show_progress=False)
    backend.train_from_iterator([" ".join(WORDS), *(f" {word}" for word in WORDS)], trainer)
    template = "<bos> $A <eos>" if mask else "<bos> $A"
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<bos>", 1), ("<eos>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        unk_token="<unk>", pad_token="<pad>", **({"mask_token": "<mask>"} if mask else {}))
    tokenizer.save_pretrained(folder)


def save_byte_level_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer as Qwen 2 ships (GPT-2's byte alphabet, its split pattern, no BOS), trained on
    WORDS: what transformers reads a qwen2 folder with whatever the folder says."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # ASCII bytes only (in GPT-2's byte alphabet, a space is "Ġ"): a random tiny model picks any token, and ExecuTorch's
    # runner cannot hand its Python binding a piece that is part of a multi-byte character.
    ascii_bytes = [chr(code) for code in range(33, 127)] + ["Ġ"]
    trainer = trainers.BpeTrainer(vocab_size=200, initial_alphabet=ascii_bytes, limit_alphabet=len(ascii_bytes),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    backend.train_from_iterator([" ".join(WORDS), *(f" {word}" for word in WORDS)], trainer)
    trained = json.loads(backend.to_str())["model"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in trained["merges"]]
    Qwen2Tokenizer(vocab=trained["vocab"], merges=merges).save_pretrained(folder)


def _config(arch: str, tie: bool):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config

    # One decoder layer where the layers would be alike (a second tests nothing more, and costs seconds in every
    # stage of every build). Gemma 3 keeps two, one sliding-window and one full-attention; so does Qwen 3, the hub
    # source's model: with one layer its greedy text passes through ids the 120-token tokenizer has no text for
    # (the model's vocabulary is 128), where ExecuTorch's C++ runner then prints another text than the .pte's.
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=tie,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gemma3":
        # head_dim 48 is not hidden / heads (32): runner metadata must read it from the config, as for Gemma 3.
        return Gemma3TextConfig(**{**common, "num_hidden_layers": 2}, head_dim=48, sliding_window=64,
                                query_pre_attn_scalar=48, layer_types=["sliding_attention", "full_attention"])
    if arch == "qwen3":
        return Qwen3Config(**{**common, "num_hidden_layers": 2}, head_dim=32)
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


def save_gguf(path: Path, seed: int = 1, vocabulary: str = "gpt2") -> Path:
    """A tiny float32 llama GGUF. `vocabulary` "gpt2": byte-level BPE as Llama 3 GGUFs ship it (ExecuTorch's C++
    tokenizer reads its conversion); "llama": sentencepiece-style (converted with a Metaspace pre-tokenizer, which
    that tokenizer cannot read)."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config("llama", tie=False)
    if vocabulary == "gpt2":
        config.vocab_size = 192  # a token per ASCII byte
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
    if vocabulary == "gpt2":
        _add_byte_level_vocabulary(writer, config.vocab_size)
    else:
        _add_sentencepiece_vocabulary(writer, config.vocab_size)
    for name, tensor in model.state_dict().items():
        writer.add_tensor(_gguf_tensor_name(name), tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_sentencepiece_vocabulary(writer, vocab_size: int) -> None:
    pieces = sorted({c for w in WORDS for c in w} | {"\u2581"})
    tokens = ["<unk>", "<s>", "</s>"] + pieces + [f"\u2581{w}" for w in WORDS]
    tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 3 + [-float(i) for i in range(len(tokens) - 3)])
    writer.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _add_byte_level_vocabulary(writer, vocab_size: int) -> None:
    merged = ["\u0120t", "he", "\u0120the"]  # GPT-2's space (Ġ) then letters: " the" as one token
    # ASCII bytes only: a random model would otherwise emit half a UTF-8 character, which the runner's Python
    # binding cannot hand to its callback.
    ascii_bytes = _byte_symbols()[:128]
    tokens = ["<|begin_of_text|>", "<|end_of_text|>"] + ascii_bytes + merged
    tokens += [f"<|extra_{i}|>" for i in range(vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    normal = len(ascii_bytes) + len(merged)
    writer.add_token_types([3, 3] + [1] * normal + [3] * (len(tokens) - 2 - normal))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges(["\u0120 t", "h e", "\u0120t he"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)


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


def save_image_classifier(folder: Path, arch: str = "vit", seed: int = 0) -> Path:
    """A tiny image classifier: ViT (attention over patches) or ResNet (convolutional)."""
    import torch
    from transformers import AutoModelForImageClassification, ResNetConfig, ViTConfig

    torch.manual_seed(seed)
    if arch == "vit":
        config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8, num_labels=5)
    else:
        config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5,
                              layer_type="basic")
    model = AutoModelForImageClassification.from_config(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if arch == "vit":  # what an app prepares an image with (ViT's own processor at the tiny size)
        from transformers import ViTImageProcessor

        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    if arch == "resnet":  # no image_size in its config: the processor says what it takes
        (folder / "preprocessor_config.json").write_text('{"image_processor_type": "ConvNextImageProcessor", '
                                                          '"size": {"shortest_edge": 48}, "crop_pct": 1.0}')
    return folder


def _sharpen(model) -> None:
    """Random tiny weights give near-uniform logits; scale the head so that greedy choices are not ties."""
    import torch

    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)


def _spread(model, std: float = 1.0) -> None:
    """Random tiny encoder-decoders repeat one token forever; wide weights make each token depend on the input and
    on the tokens before it, so generation exercises the cache and the positions."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, std)


def _save_random(folder: Path, auto_class, config, adjust) -> None:
    """A random-weight model of `config`, adjusted (see _sharpen, _spread) and saved with save_pretrained."""
    model = auto_class.from_config(config).eval()
    adjust(model)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)


def save_masked_lm(folder: Path, arch: str = "bert", seed: int = 0) -> Path:
    """A tiny BERT or RoBERTa with a tokenizer that has a mask token."""
    import torch
    from transformers import AutoModelForMaskedLM, BertConfig, RobertaConfig

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = BertConfig(**common, max_position_embeddings=64) if arch == "bert" else \
        RobertaConfig(**common, max_position_embeddings=66)  # RoBERTa's positions start after the padding id
    _save_random(folder, AutoModelForMaskedLM, config, _sharpen)
    save_tokenizer(folder, mask=True)
    return folder


def save_seq2seq(folder: Path, arch: str = "t5", seed: int = 0) -> Path:
    """A tiny T5 (tied, rescaled head; relative positions) or BART (learned positions, logit bias)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, BartConfig, T5Config

    torch.manual_seed(seed)
    if arch == "t5":
        config = T5Config(vocab_size=128, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                          decoder_start_token_id=0, eos_token_id=2, pad_token_id=0)
    else:
        config = BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                            max_position_embeddings=64, decoder_start_token_id=2, eos_token_id=2, bos_token_id=1,
                            pad_token_id=0, forced_eos_token_id=None)
    _save_random(folder, AutoModelForSeq2SeqLM, config, _spread)
    save_tokenizer(folder, mask=True)
    return folder


def save_speech(folder: Path, arch: str = "whisper", seed: int = 0) -> Path:
    """A tiny Whisper (log-mel window of fixed length) or Speech2Text (filter banks, convolutional subsampling)
    with its feature extractor and tokenizer."""
    import torch
    from transformers import (AutoModelForSpeechSeq2Seq, Speech2TextConfig, Speech2TextFeatureExtractor,
                              WhisperConfig, WhisperFeatureExtractor)

    torch.manual_seed(seed)
    common = dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_target_positions=64,
                  decoder_start_token_id=1, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    if arch == "whisper":
        config = WhisperConfig(**common, num_mel_bins=16, max_source_positions=50, begin_suppress_tokens=None,
                               suppress_tokens=None)
        # One second of 16 kHz audio -> 100 frames of 16 mel bins = 2 x max_source_positions.
        extractor = WhisperFeatureExtractor(feature_size=16, chunk_length=1)
    else:
        config = Speech2TextConfig(**common, input_feat_per_channel=16, num_conv_layers=2, conv_channels=32,
                                   max_source_positions=64)
        extractor = Speech2TextFeatureExtractor(feature_size=16, num_mel_bins=16)
    _save_random(folder, AutoModelForSpeechSeq2Seq, config, _spread)
    if arch == "whisper":  # multilingual, as Whisper's checkpoints: language and task tokens start the decoder
        from transformers import GenerationConfig

        generation = GenerationConfig.from_pretrained(folder)
        generation.lang_to_id, generation.task_to_id = {"<|en|>": 100, "<|fr|>": 101}, {"transcribe": 102,
                                                                                        "translate": 103}
        generation.no_timestamps_token_id, generation.is_multilingual = 104, True
        generation._from_model_config = False  # else transformers rebuilds it from the model's config on load
        generation.save_pretrained(folder)
    extractor.save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def save_multimodal(folder: Path, arch: str = "llava", seed: int = 0) -> Path:
    """A tiny vision-language (LLaVA: CLIP + llama; SmolVLM: SigLIP-like + pixel shuffle + llama) or
    audio-language model (Voxtral, AudioFlamingo3: Whisper-like encoder + projector + llama), with a tokenizer and,
    for audio, a feature extractor."""
    import torch
    from transformers import (AudioFlamingo3Config, CLIPVisionConfig, LlamaConfig, LlavaConfig, SmolVLMConfig,
                              VoxtralConfig, WhisperFeatureExtractor)
    from transformers.models.auto.modeling_auto import (AutoModelForImageTextToText, AutoModelForMultimodalLM,
                                                        AutoModelForSeq2SeqLM)

    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=MAX_POSITIONS, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0).to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    if arch == "llava":
        config = LlavaConfig(vision_config=CLIPVisionConfig(**vision, projection_dim=32).to_dict(), text_config=text,
                             image_token_id=120, vision_feature_layer=-1, vision_feature_select_strategy="default")
    elif arch == "smolvlm":
        config = SmolVLMConfig(vision_config=vision, text_config=text, image_token_id=120, scale_factor=2)
    else:
        audio = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_mel_bins=16,
                     max_source_positions=50)
        config_class = AudioFlamingo3Config if arch == "audioflamingo3" else VoxtralConfig
        config = config_class(audio_config=audio, text_config=text, audio_token_id=120)
    audio_model = arch in ("voxtral", "audioflamingo3")
    auto = AutoModelForSeq2SeqLM if arch == "audioflamingo3" else \
        AutoModelForMultimodalLM if audio_model else AutoModelForImageTextToText
    _save_random(folder, auto, config, lambda model: _spread(model, 0.5))
    if audio_model:
        WhisperFeatureExtractor(feature_size=16, chunk_length=1).save_pretrained(folder)
    save_tokenizer(folder)
    if not audio_model:
        _save_image_processing(folder, arch)
    return folder


# A chat template in the shape of the real ones: the user's turn holds an image part and a text part.
CHAT_TEMPLATE = ("{% for message in messages %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
                 "<image>{% else %} {{ part['text'] }}{% endif %}{% endfor %}{% endfor %}"
                 "{% if add_generation_prompt %} model{% endif %}")


def _save_image_processing(folder: Path, arch: str) -> None:
    """What the model's processor needs, as its checkpoint ships it: the placeholder (and, for SmolVLM, the tile
    tokens) in the tokenizer at the ids the config names (120 on), an image processor at the tiny size and a chat
    template. SmolVLM splits a 48-pixel image into 2 x 2 tiles of 32 plus the whole image."""
    from transformers import AutoTokenizer, CLIPImageProcessor, SmolVLMImageProcessor

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tiles = ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_1_col_2>", "<row_2_col_1>",
             "<row_2_col_2>"] if arch == "smolvlm" else []
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *tiles]})
    assert tokenizer.convert_tokens_to_ids("<image>") == 120
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    if arch == "smolvlm":  # its processor needs torchvision (for videos): the image processor alone
        processor = SmolVLMImageProcessor(do_image_splitting=True, size={"longest_edge": 64},
                                          max_image_size={"longest_edge": 32})
        processor.save_pretrained(folder)
    else:  # LLaVA's whole processor (its image-text-to-text pipeline loads it): 16 patches, the CLS row dropped
        from transformers import LlavaProcessor

        image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        LlavaProcessor(image_processor=image, tokenizer=tokenizer, patch_size=8, num_additional_image_tokens=1,
                       vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE).save_pretrained(folder)


def save_sentence_encoder(folder: Path, arch: str = "bert", seed: int = 0) -> Path:
    """A tiny sentence encoder laid out as sentence-transformers saves one (modules.json, 1_Pooling/config.json):
    BERT mean-pooled and normalised, or RoBERTa on its first token, not normalised."""
    import json

    import torch
    from transformers import AutoModel, BertConfig, RobertaConfig

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = BertConfig(**common, max_position_embeddings=64) if arch == "bert" else \
        RobertaConfig(**common, max_position_embeddings=66)
    _save_random(folder, AutoModel, config, lambda model: None)
    save_tokenizer(folder, mask=True)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if arch == "bert":
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": arch != "bert",
        "pooling_mode_mean_tokens": arch == "bert", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}))
    return folder
