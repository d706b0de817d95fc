"""Encoder-decoder kinds (text2text such as T5 and BART, speech recognition such as Whisper):
`encoder(inputs) -> hidden states` and `text_decoder(token [1, 1], hidden states, cache_position [1]) -> logits`
with the self-attention KV cache held as buffers (a static cache of max_seq_len positions).

The decoder calls the model's own forward, so each architecture's head is applied its own way (T5's rescaling of
a tied head, BART's logit bias, Whisper's proj_out). Cross-attention keys and values are recomputed from the hidden
states at every step: an app passes the encoder's output to each decoder call, nothing else carries over."""

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


class Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.encoder, self.input_name = model.get_encoder(), model.main_input_name

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.encoder(**{self.input_name: inputs}).last_hidden_state


class TextDecoder(torch.nn.Module):
    def __init__(self, model, max_cache_len: int):
        super().__init__()
        self.model = model
        self.static_cache = attach_static_cache(self, model.config.get_text_config(decoder=True), max_cache_len)

    def forward(self, decoder_input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor,
                cache_position: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        start_at(self.static_cache, cache_position)
        cache = EncoderDecoderCache(self.static_cache, DynamicCache())
        return self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
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
    encoder = Encoder(model).eval()
    if model.main_input_name == "input_ids":
        example = torch.tensor([[4, 5, 6]], dtype=torch.long)
        encoder_dims = {"inputs": {1: torch.export.Dim("encoder_seq_len", min=2, max=max_seq_len)}}
        hidden_dims = {1: torch.export.Dim("encoder_hidden_len", min=2, max=max_seq_len)}
    else:  # audio: a fixed-length window, as its feature extractor pads every clip to
        example = torch.from_numpy(inputs.audio_features(model.name_or_path, 0, model.main_input_name))
        encoder_dims, hidden_dims = None, None
    with torch.no_grad():
        hidden = encoder(example)
    decoder = TextDecoder(model, max_seq_len).eval()
    start = torch.tensor([[_start_token(model)]], dtype=torch.long)
    return {"encoder": ExportableMethod(encoder, (example,), encoder_dims),
            "text_decoder": ExportableMethod(decoder, (start, hidden, torch.tensor([0], dtype=torch.long)),
                                             {"decoder_input_ids": None, "encoder_hidden_states": hidden_dims,
                                              "cache_position": None})}


def _start_token(model) -> int:
    start = model.generation_config.decoder_start_token_id
    start = model.config.decoder_start_token_id if start is None else start
    if start is None:
        raise StageError(f"{model.name_or_path}: neither generation_config nor config sets decoder_start_token_id")
    return int(start)


def samples(model_dir: Path, model, verify: VerifyInputs) -> list[dict[str, np.ndarray]]:
    if model.main_input_name != "input_ids":
        return [{"inputs": inputs.audio_features(model_dir, index, model.main_input_name)}
                for index in range(verify.samples)]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    return [{"inputs": tokenizer(prompt, return_tensors="np")["input_ids"].astype(np.int64)}
            for prompt in verify.prompts]


def run(call: Call, sample: dict[str, np.ndarray], facts: dict, max_new_tokens: int,
        forced: list[int] | None = None) -> Outcome:
    """Greedy generation as an app chains the methods: encode once, then one decoder call per token. `forced`: fed
    those tokens instead of its own choices."""
    hidden = call("encoder", (torch.from_numpy(sample["inputs"]),))
    outcome, token = Outcome([]), facts["get_decoder_start_token_id"]
    for position in range(max_new_tokens if forced is None else len(forced)):
        logits = call("text_decoder", (torch.tensor([[token]]), hidden, torch.tensor([position])))
        token = greedy_token(logits, outcome) if forced is None else follow(logits, outcome, forced)
        if forced is None and token in facts["get_eos_ids"]:
            break
    return outcome


def metadata(model, model_dir: Path, max_seq_len: int, export: ExportSpec = STOCK_OPS) -> dict:
    config = model.config.get_text_config(decoder=True)
    return {"get_max_seq_len": max_seq_len, "get_vocab_size": config.vocab_size,
            "get_decoder_start_token_id": _start_token(model), "get_eos_ids": eos_ids(model),
            "get_encoder_input": model.main_input_name}
