"""Encoder-decoder kinds (text2text such as T5 and BART, speech recognition such as Whisper):
`encoder(inputs) -> cross-attention keys and values` and
`text_decoder(token [1, 1], cross-attention keys and values, cache_position [1]) -> logits`, with the
self-attention KV cache held as buffers (a static cache of max_seq_len positions).

The encoder method runs the model's encoder and then each decoder layer's own cross-attention module on its output,
which projects it to keys and values: all layers' keys then values, stacked as one tensor
[2 x layers, heads, encoder positions, head dim]. They are computed once per input; an app passes that tensor to
every decoder call, which reads them from the cache as transformers' generate does after its first step. The
decoder calls the model's own forward, so each architecture's head is applied its own way (T5's rescaling of a tied
head, BART's logit bias, Whisper's proj_out)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from xportbuild.errors import StageError
from xportbuild.models import inputs
from xportbuild.models.common import attach_static_cache, eos_ids, load_pretrained, start_at
from xportbuild.models.methods import Call, ExportableMethod, Outcome, follow, greedy_token
from xportbuild.recipe.spec import STOCK_OPS, ExportSpec, VerifyInputs

WHAT = "sequence-to-sequence model"  # in messages: "cannot load <folder> as a <WHAT>"


def cross_attention_modules(model, example: torch.Tensor) -> list[torch.nn.Module]:
    """The decoder's cross-attention modules in call order: those one decoder step calls with key_value_states."""
    found: list[torch.nn.Module] = []

    def note(module, args, kwargs):
        if kwargs.get("key_value_states") is not None and module not in found:
            found.append(module)

    hooks = [module.register_forward_pre_hook(note, with_kwargs=True) for module in model.get_decoder().modules()]
    try:
        with torch.no_grad():
            hidden = model.get_encoder()(**{model.main_input_name: example}).last_hidden_state
            model.get_decoder()(input_ids=torch.tensor([[_start_token(model)]]), encoder_hidden_states=hidden)
    finally:
        for hook in hooks:
            hook.remove()
    if not found:
        raise StageError(f"{model.name_or_path}: its decoder calls no module with key_value_states: its "
                         "cross-attention is not one transformers' encoder-decoder cache holds")
    return found


class Encoder(torch.nn.Module):
    """The encoder, then each cross-attention module projecting its output into the cache (the module's query on
    one row is computed and dropped: the keys and values are what is kept)."""

    def __init__(self, model, example: torch.Tensor):
        super().__init__()
        self.encoder, self.input_name = model.get_encoder(), model.main_input_name
        self.cross_attention = torch.nn.ModuleList(cross_attention_modules(model, example))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache, EncoderDecoderCache

        hidden = self.encoder(**{self.input_name: inputs}).last_hidden_state
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        for module in self.cross_attention:
            module(hidden_states=hidden[:, :1], key_value_states=hidden, past_key_values=cache)
        layers = cache.cross_attention_cache.layers
        return torch.cat([torch.cat([layer.keys for layer in layers]), torch.cat([layer.values for layer in layers])])


class TextDecoder(torch.nn.Module):
    def __init__(self, model, max_cache_len: int):
        super().__init__()
        self.model, self.width = model, model.config.get_text_config(decoder=True).d_model
        self.static_cache = attach_static_cache(self, model.config.get_text_config(decoder=True), max_cache_len)

    def forward(self, decoder_input_ids: torch.Tensor, cross_attention: torch.Tensor,
                cache_position: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        start_at(self.static_cache, cache_position)
        layers, cross = cross_attention.shape[0] // 2, DynamicCache()
        for index in range(layers):
            cross.update(cross_attention[index:index + 1], cross_attention[layers + index:layers + index + 1], index)
        cache = EncoderDecoderCache(self.static_cache, cross)  # filled: every layer reads its keys and values
        # The model reads the encoder's output only for its length (its mask): zeros of that length stand for it.
        hidden = cross_attention.new_zeros(1, cross_attention.shape[2], self.width)
        return self.model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                          decoder_input_ids=decoder_input_ids, past_key_values=cache, use_cache=True).logits


def _is_speech(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES

    return model_type in MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES


def auto_class(model_dir: Path):
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq

    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type", "")
    return AutoModelForSpeechSeq2Seq if _is_speech(model_type) else AutoModelForSeq2SeqLM


def load_model(model_dir: Path):
    return load_pretrained(auto_class(model_dir), model_dir, WHAT)


def _decoder_limit(model) -> int | None:
    config = model.config.get_text_config(decoder=True)
    return getattr(config, "max_target_positions", None) or getattr(config, "max_position_embeddings", None)


def exportables(model, max_seq_len: int, export: ExportSpec = STOCK_OPS) -> dict[str, ExportableMethod]:
    limit = _decoder_limit(model)
    if limit is not None and max_seq_len > limit:
        raise StageError(f"max_seq_len = {max_seq_len} exceeds the decoder's {limit} positions: lower max_seq_len")
    if model.main_input_name == "input_ids":
        example = torch.tensor([[4, 5, 6]], dtype=torch.long)
        encoder_dims = {"inputs": {1: torch.export.Dim("encoder_seq_len", min=2, max=max_seq_len)}}
        positions = {2: torch.export.Dim("encoder_positions", min=2, max=max_seq_len)}
    else:  # audio: a fixed-length window, as its feature extractor pads every clip to
        example = torch.from_numpy(inputs.audio_features(model.name_or_path, 0, model.main_input_name))
        encoder_dims, positions = None, None
    encoder = Encoder(model, example).eval()
    with torch.no_grad():
        cross_attention = encoder(example)
    decoder = TextDecoder(model, max_seq_len).eval()
    start = torch.tensor([[_start_token(model)]], dtype=torch.long)
    return {"encoder": ExportableMethod(encoder, (example,), encoder_dims),
            "text_decoder": ExportableMethod(decoder, (start, cross_attention, torch.tensor([0], dtype=torch.long)),
                                             {"decoder_input_ids": None, "cross_attention": positions,
                                              "cache_position": None})}


def _start_token(model) -> int:
    start = model.generation_config.decoder_start_token_id
    start = model.config.decoder_start_token_id if start is None else start
    if start is None:
        raise StageError(f"{model.name_or_path}: neither generation_config nor config sets decoder_start_token_id")
    return int(start)


def samples(model_dir: Path, model, verify: VerifyInputs) -> list[dict[str, np.ndarray]]:
    if model.main_input_name != "input_ids":
        facts = metadata(model, model_dir, 0)
        # Verified in the first language the model names (no detection: a generated clip has no language).
        languages = json.loads(facts.get("get_languages", "{}"))
        prefix = np.array(decoder_prefix(facts, next(iter(languages), None), None), dtype=np.int64)
        return [{"inputs": inputs.audio_features(model_dir, index, model.main_input_name), "decoder_prefix": prefix}
                for index in range(verify.samples)]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    return [{"inputs": tokenizer(prompt, return_tensors="np")["input_ids"].astype(np.int64)}
            for prompt in verify.prompts]


DETECTED = -1  # in a decoder prefix: the language the model detects there


def decoder_prefix(facts: dict, language: str | None, task: str | None) -> list[int]:
    """The tokens a speech decoder starts from, as transformers' Whisper generation builds them: the start token and
    the generation config's forced tokens, the language (`language` None on a multilingual model: DETECTED, the
    model's own choice among its languages), the task (given, or transcribe once a language is given), and the
    no-timestamps token."""
    languages, tasks = (json.loads(facts.get(name, "{}")) for name in ("get_languages", "get_tasks"))
    for chosen, known, what in ((language, languages, "language"), (task, tasks, "task")):
        if chosen is not None and chosen not in known:
            raise StageError(f"{what} {chosen!r} is not one this model knows"
                             f"{': ' + ', '.join(known) if known else ' (its generation config names none)'}")
    prefix = list(facts.get("get_prefix_ids") or [facts["get_decoder_start_token_id"]])
    if language is not None or (languages and (len(prefix) == 1 or prefix[1] == DETECTED)):
        chosen = languages[language] if language is not None else DETECTED
        prefix[1:2] = [chosen]
    task_ids = set(tasks.values())
    if task is not None or (language is not None and tasks and not task_ids & set(prefix)):
        prefix = [t for t in prefix if t not in task_ids] + [tasks[task or "transcribe"]]
    if facts.get("get_no_timestamps_id", -1) >= 0 and prefix[-1] != facts["get_no_timestamps_id"]:
        prefix.append(facts["get_no_timestamps_id"])
    return prefix


def _masked(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    if not banned:
        return logits
    logits = logits.clone()
    logits[..., banned] = -torch.inf
    return logits


def run(call: Call, sample: dict[str, np.ndarray], facts: dict, max_new_tokens: int,
        forced: list[int] | None = None) -> Outcome:
    """Greedy generation as an app chains the methods: encode once (the cross-attention keys and values), feed the
    decoder prefix (a DETECTED language chosen among the model's languages), then one decoder call per token, with
    the generation config's suppressed tokens. `forced`: fed those tokens instead of its own choices."""
    cross_attention = call("encoder", (torch.from_numpy(sample["inputs"]),))
    prefix = [int(t) for t in sample.get("decoder_prefix", [facts["get_decoder_start_token_id"]])]
    languages = list(json.loads(facts.get("get_languages", "{}")).values())
    outcome, logits = Outcome([]), None
    for position, token in enumerate(prefix):
        if token == DETECTED:
            token = languages[int(logits[0, -1, languages].argmax())]
        logits = call("text_decoder", (torch.tensor([[token]]), cross_attention, torch.tensor([position])))
    suppressed, steps = list(facts.get("get_suppress_tokens", ())), max_new_tokens if forced is None else len(forced)
    for step in range(steps):
        banned = suppressed + list(facts.get("get_begin_suppress_tokens", ())) if step == 0 else suppressed
        scores = _masked(logits, banned)
        token = greedy_token(scores, outcome) if forced is None else follow(scores, outcome, forced)
        if step + 1 == steps or forced is None and token in facts["get_eos_ids"]:
            break
        logits = call("text_decoder", (torch.tensor([[token]]), cross_attention, torch.tensor([len(prefix) + step])))
    return outcome


def metadata(model, model_dir: Path, max_seq_len: int, export: ExportSpec = STOCK_OPS) -> dict:
    config = model.config.get_text_config(decoder=True)
    return {"get_max_seq_len": max_seq_len, "get_vocab_size": config.vocab_size,
            "get_decoder_start_token_id": _start_token(model), "get_eos_ids": eos_ids(model),
            "get_encoder_input": model.main_input_name, **_audio_shape(model), **_speech_prompting(model)}


def _speech_prompting(model) -> dict:
    """What a speech decoder starts from and must not say, from the generation config (Whisper's languages, tasks,
    no-timestamps token, suppressed tokens): JSON maps of name -> token id, and id lists."""
    config = model.generation_config
    facts = {}
    if getattr(config, "lang_to_id", None):
        facts["get_languages"] = json.dumps({name.strip("<|>"): int(i) for name, i in config.lang_to_id.items()})
    if getattr(config, "task_to_id", None):
        facts["get_tasks"] = json.dumps({name: int(i) for name, i in config.task_to_id.items()})
    if getattr(config, "forced_decoder_ids", None):  # [[1, language or None], [2, task], ...]
        forced = [token if token is not None else DETECTED for _, token in sorted(config.forced_decoder_ids)]
        facts["get_prefix_ids"] = [_start_token(model), *forced]
    if getattr(config, "no_timestamps_token_id", None) is not None:
        facts["get_no_timestamps_id"] = int(config.no_timestamps_token_id)
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        if getattr(config, name, None):
            facts[f"get_{name}"] = [int(i) for i in getattr(config, name)]
    return facts


def _audio_shape(model) -> dict:
    """For audio, the features' shape the encoder was exported at (an app pads or cuts a clip's frames to it)."""
    if model.main_input_name == "input_ids":
        return {}
    return {"get_input_shape": list(inputs.audio_features(model.name_or_path, 0, model.main_input_name).shape)}
