"""Verification inputs generated, never fetched: images and audio clips, deterministic per index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xportbuild.errors import StageError

DEFAULT_IMAGE_SIZE = 224
AUDIO_SECONDS = 1.0


def image_shape(config, model_dir: Path) -> tuple[int, int, int]:
    """(channels, height, width) a model takes: its (vision) config's image_size, else its processor's size."""
    channels = getattr(config, "num_channels", 3)
    size = getattr(config, "image_size", None)
    processor = Path(model_dir) / "preprocessor_config.json"
    if size is None and processor.is_file():
        declared = json.loads(processor.read_text())
        size = declared.get("crop_size") or declared.get("size")
        if isinstance(size, dict):
            size = size.get("height") or size.get("shortest_edge")
    size = size or DEFAULT_IMAGE_SIZE
    height, width = size if isinstance(size, (list, tuple)) else (size, size)
    return channels, height, width


def generated_image(index: int, shape: tuple[int, int, int]) -> np.ndarray:
    """A [1, C, H, W] image in [-1, 1] (the range a processor normalizes to): a gradient and stripes whose angle and
    frequency depend on `index`."""
    channels, height, width = shape
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(index)
    planes = []
    for channel in range(channels):
        angle, frequency = rng.uniform(0, np.pi), rng.uniform(2, 8)
        stripes = np.sin(frequency * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / max(height, width))
        gradient = (x / width if channel % 2 else y / height) * 2 - 1
        planes.append(0.6 * stripes + 0.4 * gradient)
    return np.stack(planes)[None].astype(np.float32)


def generated_audio(index: int, sampling_rate: int, seconds: float = AUDIO_SECONDS) -> np.ndarray:
    """A mono clip: a chirp plus a tone, frequencies depending on `index`."""
    t = np.arange(int(sampling_rate * seconds), dtype=np.float64) / sampling_rate
    rng = np.random.default_rng(index)
    low, high, tone = rng.uniform(150, 400), rng.uniform(600, 2000), rng.uniform(200, 1200)
    chirp = np.sin(2 * np.pi * (low + (high - low) * t / (2 * seconds)) * t)
    return (0.5 * chirp + 0.3 * np.sin(2 * np.pi * tone * t)).astype(np.float32)


def audio_features(model_dir: Path, index: int, input_name: str) -> np.ndarray:
    """Generated clip `index` through the model's own feature extractor (e.g. log-mel frames)."""
    from transformers import AutoFeatureExtractor

    try:
        extractor = AutoFeatureExtractor.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise StageError(f"{model_dir}: an audio model needs its feature extractor (preprocessor_config.json): "
                         f"{err}") from err
    audio = generated_audio(index, extractor.sampling_rate)
    features = extractor(audio, sampling_rate=extractor.sampling_rate, return_tensors="np")
    return np.asarray(features[input_name], dtype=np.float32)
