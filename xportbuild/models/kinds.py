"""The task kinds: which methods each one's .pte holds and which module wraps it. Imports no torch."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    """A task kind: one exportable wrapper (its module) shared by every architecture of that kind.

    `auto_mappings` name transformers' model-type tables of the Auto classes that load it, so a model type the kind
    cannot load is rejected from its config alone. `logit_methods` return scores over a vocabulary or labels:
    verify compares their top-1 as well as their values.
    """

    task: str
    module: str
    methods: tuple[str, ...]
    auto_mappings: tuple[str, ...]
    logit_methods: tuple[str, ...]
    generates: bool  # True: verified by generating tokens; False: by the labels or tokens of one forward

    def wrapper(self):
        """The kind's module (imports torch)."""
        return importlib.import_module(self.module)


KINDS: dict[str, Kind] = {kind.task: kind for kind in (
    Kind("causal-lm", "xportbuild.models.causal_lm", ("forward",), ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",),
         ("forward",), True),
    Kind("masked-lm", "xportbuild.models.masked_lm", ("forward",), ("MODEL_FOR_MASKED_LM_MAPPING_NAMES",),
         ("forward",), False),
    Kind("image-classification", "xportbuild.models.image_classifier", ("forward",),
         ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",), ("forward",), False),
    Kind("text2text", "xportbuild.models.seq2seq", ("encoder", "text_decoder"),
         ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",), ("text_decoder",), True),
    Kind("speech-recognition", "xportbuild.models.seq2seq", ("encoder", "text_decoder"),
         ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",), ("text_decoder",), True),
    Kind("image-text-to-text", "xportbuild.models.multimodal", ("token_embedding", "text_decoder", "vision_encoder"),
         ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",), ("text_decoder",), True),
    Kind("audio-text-to-text", "xportbuild.models.multimodal", ("token_embedding", "text_decoder", "audio_encoder"),
         ("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"), ("text_decoder",), True),
)}


def kind_of(task: str) -> Kind:
    return KINDS[task]
