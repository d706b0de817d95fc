"""A published artifact used as an app uses it: `load(folder)` reads the .pte's constant methods (its task, labels,
token ids, shapes) and the tokenizer and processor files published beside it, never the torch model, and gives the
kind's natural call:

    generate (causal LM, text-to-text, image/audio-text-to-text), fill_mask, classify, transcribe, embed.

The methods are chained by the kind's own `run` (xportbuild/models/<kind>.py), the chain verify ran on this .pte.
`python -m xportbuild run` is a thin layer over this module.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xportbuild.errors import XportError

PTE_NAME = "model.pte"
# Constant methods holding lists of numbers: one of a single element still is a list (the runtime returns every value
# as a list).
_LIST_SUFFIXES = ("_ids", "_tokens", "_shape")


class ArtifactError(XportError):
    """An artifact that cannot be used: a missing file, or a .pte this version cannot read."""


@dataclass
class Figures:
    """How long the last call took: program load, the first output (first generated token, or the whole output
    where nothing is generated), and generation speed."""

    load_s: float
    first_output_s: float = 0.0
    generated_tokens: int = 0
    generate_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"load {_duration(self.load_s)}", f"first output {_duration(self.first_output_s)}"]
        if self.generated_tokens:
            rate = self.generated_tokens / self.generate_s if self.generate_s else float("inf")
            parts.append(f"{self.generated_tokens} tokens at {rate:.1f} tok/s")
        parts += [f"{name} {value}" for name, value in self.extra.items()]
        return ", ".join(parts)


def _duration(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1000:.1f} ms"


class Artifact:
    """A loaded .pte with its facts; subclasses give each kind's call."""

    takes: tuple[str, ...] = ()  # the run command's options its call needs

    def __init__(self, pte: Path, facts: dict, module, load_s: float):
        self.pte, self.folder, self.facts, self._module = pte, pte.parent, facts, module
        self.task = facts.get("get_task", "")
        self.figures = Figures(load_s)

    def call(self, method: str, args: tuple):
        return self._module.run_method(method, args)[0]

    def _timed_call(self):
        """`call`, noting when its first call returned (the first output's latency)."""
        started, first = time.perf_counter(), []

        def call(method: str, args: tuple):
            output = self.call(method, args)
            if not first:
                first.append(time.perf_counter() - started)
            return output

        return call, started, first

    @functools.lru_cache(maxsize=None)  # noqa: B019  one per artifact object, loaded on first use
    def _tokenizer(self):
        from transformers import AutoTokenizer

        if not (self.folder / "tokenizer.json").is_file() and not (self.folder / "tokenizer_config.json").is_file():
            raise ArtifactError(f"{self.folder}: no tokenizer.json beside {self.pte.name}")
        return AutoTokenizer.from_pretrained(self.folder, trust_remote_code=False)

    @functools.lru_cache(maxsize=None)  # noqa: B019  one per artifact object, loaded on first use
    def _processor(self, what: str):
        """The image processor or feature extractor published beside the .pte."""
        from transformers import AutoFeatureExtractor, AutoImageProcessor

        if not (self.folder / "preprocessor_config.json").is_file():
            raise ArtifactError(f"{self.folder}: no preprocessor_config.json beside {self.pte.name}: the model "
                                f"ships no {what}, so an app cannot prepare its input")
        auto = AutoImageProcessor if what == "image processor" else AutoFeatureExtractor
        return auto.from_pretrained(self.folder, trust_remote_code=False)


class TextGenerator(Artifact):
    """A causal LM, run by ExecuTorch's C++ LLM runner (it reads the .pte's metadata and tokenizer.json)."""

    takes = ("prompt",)

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, on_piece=None) -> str:
        from xportbuild.llm_runner import generate

        tokenizer = self.folder / "tokenizer.json"
        if not tokenizer.is_file():
            raise ArtifactError(f"tokenizer {tokenizer} does not exist")
        self.figures = generate(self.pte, tokenizer, prompt, max_new_tokens, temperature, on_piece)  # the runner's
        return self.figures.text


class MaskFiller(Artifact):
    takes = ("text",)

    def fill_mask(self, text: str, top_k: int = 5) -> list:
        """The top_k fills of each mask (write it `<mask>` or as the tokenizer spells it), as transformers'
        fill-mask pipeline gives them: {score, token, token_str, sequence}; a list of such lists for several masks."""
        import torch

        from xportbuild.models.masked_lm import MASK

        tokenizer = self._tokenizer()
        encoded = tokenizer(text.replace(MASK, tokenizer.mask_token), return_tensors="np")
        ids = encoded["input_ids"].astype(np.int64)
        masks = np.flatnonzero(ids[0] == tokenizer.mask_token_id)
        if not len(masks):
            raise ArtifactError(f"the text has no mask: write {MASK} (or {tokenizer.mask_token}) where a word is "
                                "missing")
        call, started, first = self._timed_call()
        logits = call("forward", (torch.from_numpy(ids), torch.from_numpy(encoded["attention_mask"].astype(np.int64))))
        self.figures = Figures(self.figures.load_s, time.perf_counter() - started)
        fills = []
        for at in masks:
            probabilities = torch.softmax(logits[0, at].float(), dim=-1)
            scores, tokens = probabilities.topk(top_k)
            rows = []
            for score, token in zip(scores.tolist(), tokens.tolist()):
                filled = ids[0].copy()
                filled[at] = token
                rows.append({"score": score, "token": token, "token_str": tokenizer.decode([token]),
                             "sequence": tokenizer.decode(filled, skip_special_tokens=True)})
            fills.append(rows)
        return fills[0] if len(fills) == 1 else fills


class ImageClassifier(Artifact):
    takes = ("image",)

    def classify(self, image, top_k: int = 5) -> list[dict]:
        """The top_k labels of an image (a path or a PIL image) with their softmax scores, as transformers'
        image-classification pipeline gives them."""
        import torch

        processor = self._processor("image processor")
        pixels = np.asarray(processor(picture(image), return_tensors="np")["pixel_values"], dtype=np.float32)
        expected = json.loads(self.facts["get_image_shape"])
        if list(pixels.shape) != expected:
            raise ArtifactError(f"the image processor gives pixels of shape {list(pixels.shape)}, the .pte takes "
                                f"{expected}")
        call, started, first = self._timed_call()
        logits = call("forward", (torch.from_numpy(pixels),))
        self.figures = Figures(self.figures.load_s, time.perf_counter() - started)
        labels = json.loads(self.facts["get_labels"])
        scores, indices = torch.softmax(logits[0].float(), dim=-1).topk(min(top_k, len(labels)))
        return [{"label": labels[i], "score": s} for s, i in zip(scores.tolist(), indices.tolist())]


class _Generating(Artifact):
    """A kind whose chain generates tokens (its module's `run`, greedy)."""

    def _generate(self, sample: dict, max_new_tokens: int) -> list[int]:
        from xportbuild.models.kinds import kind_of

        call, started, first = self._timed_call()
        tokens = kind_of(self.task).wrapper().run(call, sample, self.facts, max_new_tokens).tokens
        total = time.perf_counter() - started
        self.figures = Figures(self.figures.load_s, first[0] if first else total, len(tokens), total)
        return [t for t in tokens if t not in self.facts.get("get_eos_ids", ())]

    def _audio_features(self, audio, sampling_rate: int | None, name: str, shape: list[int] | None) -> np.ndarray:
        """A clip (a WAV path, or samples at `sampling_rate`) through the model's feature extractor at its rate,
        padded or cut to the `shape` the encoder was exported at."""
        extractor = self._processor("feature extractor")
        from_file = isinstance(audio, (str, Path))
        samples, rate = read_audio(Path(audio)) if from_file else (np.asarray(audio), sampling_rate)
        if rate is None:
            raise ArtifactError("samples without their sampling_rate")
        clip = resampled(np.asarray(samples, dtype=np.float32), rate, extractor.sampling_rate)
        features = extractor(clip, sampling_rate=extractor.sampling_rate, return_tensors="np")[name]
        features = np.asarray(features, dtype=np.float32)
        return features if shape is None else _fit(features, list(shape))

    def _decode(self, tokens: list[int]) -> str:
        return self._tokenizer().decode(tokens, skip_special_tokens=True)


class TextToText(_Generating):
    takes = ("text",)

    def generate(self, text: str, max_new_tokens: int = 32) -> str:
        ids = self._tokenizer()(text, return_tensors="np")["input_ids"].astype(np.int64)
        return self._decode(self._generate({"inputs": ids}, max_new_tokens))


def picture(image):
    """An image file (PNG, JPEG, …) or a PIL image, in RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(image).convert("RGB") if isinstance(image, (str, Path)) else image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ArtifactError(f"{image}: not a readable image ({err})") from err


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """A WAV file's samples (mono, float in [-1, 1]) and sampling rate."""
    import wave

    try:
        with wave.open(str(path), "rb") as clip:
            width, channels, rate = clip.getsampwidth(), clip.getnchannels(), clip.getframerate()
            raw = clip.readframes(clip.getnframes())
    except (wave.Error, EOFError, OSError) as err:
        raise ArtifactError(f"{path}: not a readable WAV file ({err})") from err
    kinds = {1: (np.uint8, 128.0, 128.0), 2: (np.int16, 0.0, 32768.0), 4: (np.int32, 0.0, 2147483648.0)}
    if width not in kinds:
        raise ArtifactError(f"{path}: {8 * width}-bit samples; 8, 16 or 32-bit PCM WAV is read")
    dtype, offset, scale = kinds[width]
    samples = (np.frombuffer(raw, dtype=dtype).astype(np.float32) - offset) / scale
    return samples.reshape(-1, channels).mean(axis=1), rate


def resampled(samples: np.ndarray, rate: int, wanted: int) -> np.ndarray:
    """`samples` at `wanted` Hz (polyphase filtering, scipy)."""
    if rate == wanted:
        return samples
    from math import gcd

    from scipy.signal import resample_poly

    common = gcd(rate, wanted)
    return resample_poly(samples, wanted // common, rate // common).astype(np.float32)


def _fit(features: np.ndarray, shape: list[int]) -> np.ndarray:
    """Features padded with zeros or cut, along the axes whose length differs, to the shape the encoder was exported
    at."""
    fitted = np.zeros(shape, dtype=np.float32)
    common = tuple(slice(0, min(a, b)) for a, b in zip(features.shape, shape))
    fitted[common] = features[common]
    return fitted


class SpeechRecognizer(_Generating):
    takes = ("audio",)

    def transcribe(self, audio, sampling_rate: int | None = None, language: str | None = None,
                   task: str | None = None, max_new_tokens: int = 64) -> str:
        """The text of a clip: a WAV path, or samples with their `sampling_rate` (any rate: resampled to the
        model's). `language` None on a multilingual model: detected by the model, as transformers does."""
        from xportbuild.models.seq2seq import decoder_prefix

        features = self._audio_features(audio, sampling_rate, self.facts["get_encoder_input"],
                                        self.facts.get("get_input_shape"))
        sample = {"inputs": features, "decoder_prefix": np.array(decoder_prefix(self.facts, language, task),
                                                                 dtype=np.int64)}
        return self._decode(self._generate(sample, max_new_tokens)).strip()


class MediaTextToText(_Generating):
    """Image- or audio-text-to-text: the prompt in the model's chat template, the media as its processor prepares
    it (SmolVLM's tiles and their wrapping tokens included)."""

    @property
    def takes(self) -> tuple[str, ...]:
        return "prompt", "image" if self.facts["get_encoder_method"] == "vision_encoder" else "audio"

    def generate(self, prompt: str, image=None, audio=None, sampling_rate: int | None = None,
                 max_new_tokens: int = 32) -> str:
        """An answer about an image (a path or a PIL image) or a clip (a WAV path, or samples at `sampling_rate`)."""
        from xportbuild.models.multimodal import prepared

        if (image is None) == (audio is None):
            raise ArtifactError("give one image or one audio clip")
        if self.takes[1] != ("image" if image is not None else "audio"):
            raise ArtifactError(f"this model reads {self.takes[1]}")
        if image is not None:
            sample = prepared(self._tokenizer(), self._image_processor(), self.facts, prompt, picture(image))
        else:
            features = self._audio_features(audio, sampling_rate, "input_features", self.facts["get_media_shape"])
            sample = prepared(self._tokenizer(), None, self.facts, prompt, features)
        return self._decode(self._generate(sample, max_new_tokens)).strip()

    @functools.lru_cache(maxsize=None)  # noqa: B019  one per artifact object, loaded on first use
    def _image_processor(self):
        from xportbuild.models.multimodal import image_processor

        return image_processor(self.folder)


class Embedder(Artifact):
    takes = ("text",)

    def embed(self, texts: list[str] | str) -> np.ndarray:
        """One embedding per text ([n, dim]), pooled and normalised as the model's sentence-transformers files say."""
        import torch

        from xportbuild.models.sentence_embedding import encode

        tokenizer = self._tokenizer()
        call, started, first = self._timed_call()
        vectors = []
        for text in [texts] if isinstance(texts, str) else texts:
            sample = encode(tokenizer, text, self.facts["get_max_seq_len"])
            vectors.append(call("forward", (torch.from_numpy(sample["input_ids"]),
                                            torch.from_numpy(sample["attention_mask"])))[0].float().numpy())
        total = time.perf_counter() - started
        self.figures = Figures(self.figures.load_s, first[0] if first else total,
                               extra={"sentences/s": f"{len(vectors) / total:.1f}" if total else "-"})
        return np.stack(vectors)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# The API class of each task kind.
APPS = {"causal-lm": TextGenerator, "masked-lm": MaskFiller, "image-classification": ImageClassifier,
        "text2text": TextToText, "speech-recognition": SpeechRecognizer, "feature-extraction": Embedder,
        "image-text-to-text": MediaTextToText, "audio-text-to-text": MediaTextToText}


def read_facts(module, methods: list[str]) -> dict:
    """The program's constant methods (`get_*`), each as written at export: a scalar, a string or a list."""
    facts = {}
    for name in methods:
        if not name.startswith("get_"):
            continue
        value = module.run_method(name, ())
        listed = name.endswith(_LIST_SUFFIXES) and not (len(value) == 1 and isinstance(value[0], str))
        facts[name] = list(value) if listed or len(value) != 1 else value[0]
    return facts


def pte_path(artifact: Path | str) -> Path:
    artifact = Path(artifact)
    pte = artifact / PTE_NAME if artifact.is_dir() else artifact
    if not pte.is_file():
        raise ArtifactError(f"program {pte} does not exist (give an artifacts/<target> folder or a .pte file)")
    return pte


def load(artifact: Path | str) -> Artifact:
    """The artifact at `artifact` (its folder, or its .pte) as its kind's app object."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    from xportbuild.runtime import data_file, load_kernels

    pte = pte_path(artifact)
    load_kernels()
    started = time.perf_counter()
    try:
        module = _load_for_executorch(str(pte), data_file(pte))
    except RuntimeError as err:
        raise ArtifactError(f"{pte}: the ExecuTorch runtime cannot load it ({err})") from err
    facts = read_facts(module, module.method_names())
    load_s = time.perf_counter() - started  # the program, and its facts read as an app reads them at start
    task = facts.get("get_task")
    if task not in APPS:
        raise ArtifactError(f"{pte}: its task is {task!r}; an app call exists for "
                            f"{', '.join(APPS)} (a .pte built before tasks were recorded must be rebuilt)")
    return APPS[task](pte, facts, module, load_s)
