"""Multimodal text-to-text kinds (image-text-to-text such as LLaVA and SmolVLM, audio-text-to-text such as Voxtral):
`token_embedding(input_ids) -> embeddings`, `vision_encoder(pixel_values)` or `audio_encoder(input_features)` ->
features already projected into the text model's embedding space, and
`text_decoder(inputs_embeds, cache_position) -> logits` with the KV cache held as buffers.

An app (and verify) chains them: encode the image or audio, embed the prompt with one placeholder token per
feature row, put the features in the placeholders' rows, prefill the decoder, then embed and decode one token at
a time. The decoder calls the model's own forward on embeddings, so each architecture's text path is its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from xportbuild.errors import StageError
from xportbuild.models import inputs
from xportbuild.models.common import attach_static_cache, eos_ids, load_pretrained, start_at, text_limit
from xportbuild.models.methods import Call, ExportableMethod, Outcome, follow, greedy_token
from xportbuild.recipe.spec import STOCK_OPS, ExportSpec, VerifyInputs

WHAT = "multimodal model"  # in messages: "cannot load <folder> as a <WHAT>"


def _idefics3_image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """SmolVLM / Idefics3 on whole, unpadded image tiles ([tiles, C, H, W] at the config's image size).

    Their get_image_features drops all-zero padding images with a data-dependent index (not exportable once the
    linears are quantized), and their vision embeddings place patches with aten::bucketize (no ExecuTorch kernel).
    For a whole tile both reduce to the identity and to positions 0..patches-1, which is what this computes."""
    vision = model.model.vision_model
    patches = vision.embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
    positions = torch.arange(patches.shape[1], device=patches.device)
    hidden = vision.encoder(inputs_embeds=patches + vision.embeddings.position_embedding(positions)).last_hidden_state
    return model.model.connector(vision.post_layernorm(hidden))


def _audioflamingo3_audio_features(model, input_features: torch.Tensor) -> torch.Tensor:
    """AudioFlamingo3 on whole windows: get_audio_features keeps the valid frames with a boolean mask (a
    data-dependent shape ExecuTorch cannot plan); for a whole window every frame is valid, so the tower and the
    projector run on all of them."""
    inner = getattr(model, "model", model)
    mask = torch.ones(input_features.shape[0], input_features.shape[-1], dtype=torch.long)
    hidden = inner.audio_tower(input_features, input_features_mask=mask, return_dict=True).last_hidden_state
    return inner.multi_modal_projector(hidden)


# The per-architecture pieces: features for model types whose get_*_features cannot be exported as they are.
FEATURES_BY_MODEL_TYPE = {"smolvlm": _idefics3_image_features, "idefics3": _idefics3_image_features,
                          "audioflamingo3": _audioflamingo3_audio_features}


def _is_audio(model) -> bool:
    return getattr(model.config, "audio_token_id", None) is not None


def encoder_method(model) -> str:
    return "audio_encoder" if _is_audio(model) else "vision_encoder"


def placeholder_id(model) -> int:
    config = model.config
    token = config.audio_token_id if _is_audio(model) else getattr(config, "image_token_id", None)
    token = getattr(config, "image_token_index", None) if token is None else token
    if token is None:
        raise StageError(f"{model.name_or_path}: its config names no image or audio placeholder token")
    return int(token)


class TokenEmbedding(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embedding = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)


class MediaEncoder(torch.nn.Module):
    """The model's own get_image_features / get_audio_features (tower + projector), as [1, rows, hidden]."""

    def __init__(self, model):
        super().__init__()
        self.model, self.audio = model, _is_audio(model)
        self.model_features = FEATURES_BY_MODEL_TYPE.get(model.config.model_type)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        if self.model_features is not None:
            output = self.model_features(self.model, media)
        elif self.audio:
            output = self.model.get_audio_features(input_features=media)
        else:
            output = self.model.get_image_features(pixel_values=media)
        features = getattr(output, "pooler_output", output)
        if isinstance(features, (list, tuple)):
            features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
        return features.reshape(1, -1, features.shape[-1])


class TextDecoder(torch.nn.Module):
    def __init__(self, model, max_cache_len: int):
        super().__init__()
        self.model = model
        self.static_cache = attach_static_cache(self, model.config.get_text_config(decoder=True), max_cache_len)

    def forward(self, inputs_embeds: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        start_at(self.static_cache, cache_position)
        return self.model(inputs_embeds=inputs_embeds, past_key_values=self.static_cache, cache_position=cache_position,
                          use_cache=True).logits


def _media_rows(model) -> int:
    """Feature rows the encoder gives for one media input (one image tile, or one audio window)."""
    with torch.no_grad():
        return int(MediaEncoder(model).eval()(torch.from_numpy(_media(model, 0))).shape[1])


def auto_class(model_dir: Path):
    import json

    from transformers import AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoModelForSeq2SeqLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES

    config = json.loads((model_dir / "config.json").read_text())
    if "audio_token_id" not in config:
        return AutoModelForImageTextToText
    # Audio LMs are registered either as multimodal LMs (Voxtral) or as seq2seq LMs (AudioFlamingo3).
    return AutoModelForMultimodalLM if config.get("model_type") in MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES \
        else AutoModelForSeq2SeqLM


def load_model(model_dir: Path):
    return load_pretrained(auto_class(model_dir), model_dir, WHAT)


def _media(model, index: int) -> np.ndarray:
    if _is_audio(model):
        return inputs.audio_features(model.name_or_path, index, "input_features")
    return inputs.generated_image(index, inputs.image_shape(model.config.vision_config, model.name_or_path))


def exportables(model, max_seq_len: int, export: ExportSpec = STOCK_OPS) -> dict[str, ExportableMethod]:
    text_limit(model, max_seq_len)
    embedding, encoder = TokenEmbedding(model).eval(), MediaEncoder(model).eval()
    ids = torch.tensor([[1, 2, 3]], dtype=torch.long)
    seq_len = torch.export.Dim("seq_len", min=1, max=max_seq_len - 1)
    media = torch.from_numpy(_media(model, 0))
    with torch.no_grad():
        embeds = embedding(ids)
        # The first call installs transformers' output-capturing hooks under a lock, which strict export cannot trace.
        encoder(media)
    return {
        "token_embedding": ExportableMethod(embedding, (ids,), {"input_ids": {1: seq_len}}),
        "text_decoder": ExportableMethod(TextDecoder(model, max_seq_len).eval(), (embeds, torch.arange(3)),
                                         {"inputs_embeds": {1: seq_len}, "cache_position": {0: seq_len}}),
        encoder_method(model): ExportableMethod(encoder, (media,)),
    }


# Model types whose processor splits an image into tiles and wraps each tile's rows in tokens naming its place.
TILED = ("smolvlm", "idefics3")


def media_image(index: int, shape: tuple[int, int, int]):
    """Generated image `index` as a picture (the pixels a processor normalises to the generated array's range)."""
    from PIL import Image

    pixels = inputs.generated_image(index, shape)[0].transpose(1, 2, 0)
    return Image.fromarray(((pixels + 1.0) * 127.5).clip(0, 255).round().astype(np.uint8))


def chat_text(tokenizer, prompt: str, media_part: str) -> str | None:
    """The prompt in the model's own chat template, one image or audio part before the text, ready for an answer;
    None when the model ships no template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": [{"type": media_part}, {"type": "text", "text": prompt}]}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def expand_placeholder(text: str, placeholder: str, rows: int, tiles: tuple[int, int] | None) -> str:
    """The template's one media placeholder as the model reads it: one per feature row, or for a tiled image each
    tile's rows wrapped in the tokens transformers' SmolVLM/Idefics3 processor writes (its own function)."""
    if text.count(placeholder) != 1:
        raise StageError(f"the chat template wrote {text.count(placeholder)} media placeholders {placeholder!r}; "
                         "one is expected")
    if tiles is None:
        return text.replace(placeholder, placeholder * rows)
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    return text.replace(placeholder, get_image_prompt_string(tiles[0], tiles[1], rows, "<fake_token_around_image>",
                                                             placeholder, "<global-img>"))


def image_processor(folder: Path):
    """The model's image processor (its PIL backend: no torchvision needed)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(folder, trust_remote_code=False, backend="pil")
    except (OSError, ValueError) as err:
        raise StageError(f"{folder}: an image-text model needs its image processor (preprocessor_config.json or "
                         f"processor_config.json): {(str(err).splitlines() or [''])[0]}") from err


def prepared(tokenizer, processor, facts: dict, prompt: str, media) -> dict[str, np.ndarray]:
    """What the methods take for a prompt and an image (a picture, through the image `processor`) or audio features
    (`processor` None): input_ids with the media's placeholders laid out as the model's processor lays them out (in
    its chat template; without one, after BOS) and the media as the encoder takes it ([tiles, C, H, W] for an
    image)."""
    audio = facts["get_encoder_method"] == "audio_encoder"
    tiles = None
    if audio:
        pixels = np.asarray(media, dtype=np.float32)
    else:
        tiled = facts.get("get_media_layout") == "tiles"
        processed = processor(media, return_tensors="np", **({"return_row_col_info": True} if tiled else {}))
        pixels = np.asarray(processed["pixel_values"], dtype=np.float32)
        pixels = pixels.reshape(-1, *pixels.shape[-3:])
        tiles = (int(processed["rows"][0][0]), int(processed["cols"][0][0])) if tiled else None
    text = chat_text(tokenizer, prompt, "audio" if audio else "image")
    if text is None:
        ids = with_placeholders(tokenizer(prompt)["input_ids"], pixels.shape[0] * facts["get_media_rows"], facts)
    else:
        placeholder = tokenizer.convert_ids_to_tokens(facts["get_placeholder_token_id"])
        text = expand_placeholder(text, placeholder, facts["get_media_rows"], tiles)
        bos = tokenizer.bos_token
        ids = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
    return {"input_ids": np.array([ids], dtype=np.int64), "media": pixels}


def samples(model_dir: Path, model, verify: VerifyInputs) -> list[dict[str, np.ndarray]]:
    """One generated image or clip per prompt, prepared as an app prepares them (`prepared`)."""
    from transformers import AutoTokenizer

    facts, tokenizer = metadata(model, model_dir, 0), AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    if _is_audio(model):
        return [prepared(tokenizer, None, facts, prompt, _media(model, index))
                for index, prompt in enumerate(verify.prompts)]
    processor, shape = image_processor(model_dir), inputs.image_shape(model.config.vision_config, model.name_or_path)
    return [prepared(tokenizer, processor, facts, prompt, media_image(index, shape))
            for index, prompt in enumerate(verify.prompts)]


def with_placeholders(prompt_ids: list[int], rows: int, facts: dict) -> list[int]:
    """The prompt with `rows` placeholder tokens after its BOS (or first), where the features go: for a model that
    ships no chat template."""
    at = 1 if prompt_ids and prompt_ids[0] == facts.get("get_bos_id") else 0
    return prompt_ids[:at] + [facts["get_placeholder_token_id"]] * rows + prompt_ids[at:]


def run(call: Call, sample: dict[str, np.ndarray], facts: dict, max_new_tokens: int,
        forced: list[int] | None = None) -> Outcome:
    """Encode the media (an image tile by tile: the encoder takes one), put the features in the placeholders' rows,
    prefill, then embed and decode one token at a time."""
    media = torch.from_numpy(sample["media"])
    pieces = [media] if facts["get_encoder_method"] == "audio_encoder" else [tile[None] for tile in media]
    features = torch.cat([call(facts["get_encoder_method"], (piece,)) for piece in pieces], dim=1)
    ids = sample["input_ids"][0].tolist()
    if len(ids) + max_new_tokens > facts["get_max_seq_len"]:
        raise StageError(f"a prompt of {len(ids)} tokens ({features.shape[1]} for the media) plus max_new_tokens="
                         f"{max_new_tokens} exceeds max_seq_len={facts['get_max_seq_len']}: raise max_seq_len")
    input_ids = torch.tensor([ids])
    placeholders = int((input_ids == facts["get_placeholder_token_id"]).sum())
    if placeholders != features.shape[1]:
        raise StageError(f"the prompt holds {placeholders} media placeholders for {features.shape[1]} feature rows")
    embeds = call("token_embedding", (input_ids,)).clone()
    embeds[input_ids == facts["get_placeholder_token_id"]] = features.reshape(-1, features.shape[-1])
    outcome = Outcome([])

    def choose(logits: torch.Tensor) -> int:
        return greedy_token(logits, outcome) if forced is None else follow(logits, outcome, forced)

    token = choose(call("text_decoder", (embeds, torch.arange(len(ids)))))
    for position in range(len(ids), len(ids) + (max_new_tokens if forced is None else len(forced)) - 1):
        if forced is None and token in facts["get_eos_ids"]:
            break
        embedded = call("token_embedding", (torch.tensor([[token]]),))
        token = choose(call("text_decoder", (embedded, torch.tensor([position]))))
    return outcome


def metadata(model, model_dir: Path, max_seq_len: int, export: ExportSpec = STOCK_OPS) -> dict:
    config = model.config.get_text_config()
    facts = {"get_max_seq_len": max_seq_len, "get_vocab_size": config.vocab_size, "get_eos_ids": eos_ids(model),
             "get_placeholder_token_id": placeholder_id(model), "get_encoder_method": encoder_method(model),
             "get_media_shape": list(_media(model, 0).shape), "get_media_rows": _media_rows(model)}
    if config.model_type in TILED or model.config.model_type in TILED:
        facts["get_media_layout"] = "tiles"
    if config.bos_token_id is not None:
        facts["get_bos_id"] = int(config.bos_token_id)
    return facts
