"""The task kinds: which methods each one's .pte holds and which module wraps it. Imports no torch."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Kind:
    """A task kind: one exportable wrapper (its module) shared by every architecture of that kind.

    `auto_mappings` name transformers' model-type tables of the Auto classes that load it, so a model type the kind
    cannot load is rejected from its config alone. `logit_methods` return scores over a vocabulary or labels:
    verify compares their top-1 as well as their values. `prompted`: verified on the model file's prompts (else on
    generated images or audio only); `generates`: verified by generating tokens (else by one forward's labels or
    tokens).
    """

    task: str
    module: str
    methods: tuple[str, ...]
    auto_mappings: tuple[str, ...]
    logit_methods: tuple[str, ...]
    generates: bool
    prompted: bool = True
    refused: dict[str, str] = field(default_factory=dict)  # model_type -> why it cannot be exported as this kind
    # The recipe's custom attention ops (export.custom_sdpa / custom_kv_cache) and one shared tied table: only a
    # kind whose wrapper implements them accepts them.
    custom_attention: bool = False
    from_gguf: bool = False  # transformers converts GGUF files to this kind
    # Generated tokens follow the prompt in one sequence: a prompt must leave room for max_new_tokens.
    prompt_continued: bool = False
    # How the reference stores its logit outputs. float16 where hundreds of positions over a vocabulary of 262k would
    # take a gigabyte in float32: half precision moves a logit by at most 0.016 below 64, under every tolerance, but
    # can flip a near-tie's top-1, so kinds whose outputs are small keep float32.
    reference_logits: str = "float32"
    # Every method takes integers only (token ids, positions, masks): a program may compute in half precision, since
    # nothing recorded in float32 (pixels, audio features, another method's outputs) is fed to it.
    integer_inputs: bool = False
    # Its sequence can be exported one token per call (an app then prefills token by token): what backends that
    # lower fixed shapes only (OpenVINO, Core ML) take of a kind with a sequence.
    token_by_token: bool = False
    # Its outputs are vectors an app compares with each other (embeddings): verify also compares, across the samples,
    # each one's nearest neighbour with the float model's.
    compares_neighbours: bool = False

    @property
    def has_sequence(self) -> bool:
        """Whether max_seq_len means anything: the longest prompt or the generated length."""
        return self.prompted or self.generates

    def wrapper(self):
        """The kind's module (imports torch)."""
        return importlib.import_module(self.module)


# Decoder families transformers loads as causal LMs that do not export, for a cause their config does not show (found
# by the family sweep, tests/integration/test_families.py): validate refuses them before any work. Causes a config
# shows (a cache that is not a key/value cache, latent attention wider than the cache) are derived for every family
# by the kind's `export_blocker` (models/causal_lm.py).
REFUSED_DECODERS = {
    "falcon": "transformers' static cache gives multi-query Falcon as many key/value heads as query heads, so its "
              "cache and its attention disagree (Falcon3 models are llama and export)",
    "biogpt": "without an attention mask it builds one as long as the cache's length plus the input, a data-dependent "
              "shape torch.export cannot trace",
    "mpt": "its ALiBi bias is sliced by the cache's length, a data-dependent shape torch.export cannot trace",
}

KINDS: dict[str, Kind] = {kind.task: kind for kind in (
    Kind("causal-lm", "xportbuild.models.causal_lm", ("forward",), ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",),
         ("forward",), True, refused=REFUSED_DECODERS, custom_attention=True, from_gguf=True, prompt_continued=True,
         reference_logits="float16", integer_inputs=True, token_by_token=True),
    Kind("masked-lm", "xportbuild.models.masked_lm", ("forward",), ("MODEL_FOR_MASKED_LM_MAPPING_NAMES",),
         ("forward",), False, integer_inputs=True),
    Kind("feature-extraction", "xportbuild.models.sentence_embedding", ("forward",), ("MODEL_MAPPING_NAMES",), (),
         False, integer_inputs=True, compares_neighbours=True),
    Kind("image-classification", "xportbuild.models.image_classifier", ("forward",),
         ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",), ("forward",), False, prompted=False),
    Kind("text2text", "xportbuild.models.seq2seq", ("encoder", "text_decoder"),
         ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",), ("text_decoder",), True),
    Kind("speech-recognition", "xportbuild.models.seq2seq", ("encoder", "text_decoder"),
         ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",), ("text_decoder",), True, prompted=False),
    Kind("image-text-to-text", "xportbuild.models.multimodal", ("token_embedding", "text_decoder", "vision_encoder"),
         ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",), ("text_decoder",), True),
    Kind("audio-text-to-text", "xportbuild.models.multimodal", ("token_embedding", "text_decoder", "audio_encoder"),
         ("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"), ("text_decoder",), True),
)}


def kind_of(task: str) -> Kind:
    return KINDS[task]


def kinds_with(feature: str) -> list[str]:
    """The tasks whose kind has `feature` (a boolean field), for messages that say which kinds accept a knob."""
    return [kind.task for kind in KINDS.values() if getattr(kind, feature)]
