"""Image classification kind: `forward(pixel_values) -> logits` at the model's input size.

Verification images are generated (smooth gradients and stripes, deterministic per index), already in the
normalized range a processor produces: nothing is fetched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from xportbuild.models.common import load_pretrained
from xportbuild.models.methods import Call, ExportableMethod, Outcome
from xportbuild.recipe.spec import VerifyInputs

DEFAULT_IMAGE_SIZE = 224


class ClassifierForward(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def load_model(model_dir: Path):
    from transformers import AutoModelForImageClassification

    return load_pretrained(AutoModelForImageClassification, model_dir, "image classifier")


def image_shape(model) -> tuple[int, int, int]:
    """(channels, height, width) the model takes: its config's image_size, else its fetched processor's size."""
    config = model.config
    channels = getattr(config, "num_channels", 3)
    size = getattr(config, "image_size", None)
    processor = Path(model.name_or_path) / "preprocessor_config.json"
    if size is None and processor.is_file():
        declared = json.loads(processor.read_text())
        size = declared.get("crop_size") or declared.get("size")
        if isinstance(size, dict):
            size = size.get("height") or size.get("shortest_edge")
    size = size or DEFAULT_IMAGE_SIZE
    height, width = size if isinstance(size, (list, tuple)) else (size, size)
    return channels, height, width


def generated_image(index: int, shape: tuple[int, int, int]) -> np.ndarray:
    """A deterministic test image in [-1, 1]: a gradient and stripes whose angle and frequency depend on `index`."""
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


def exportables(model, max_seq_len: int) -> dict[str, ExportableMethod]:
    example = torch.from_numpy(generated_image(0, image_shape(model)))
    return {"forward": ExportableMethod(ClassifierForward(model).eval(), (example,))}


def samples(model_dir: Path, model, verify: VerifyInputs) -> list[dict[str, np.ndarray]]:
    shape = image_shape(model)
    return [{"pixel_values": generated_image(index, shape)} for index in range(verify.samples)]


def run(call: Call, sample: dict[str, np.ndarray], facts: dict, max_new_tokens: int) -> Outcome:
    scores = call("forward", (torch.from_numpy(sample["pixel_values"]),))[0].float().numpy()
    return Outcome([int(scores.argmax())], [scores])


def metadata(model, model_dir: Path, max_seq_len: int) -> dict:
    channels, height, width = image_shape(model)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return {"get_num_labels": model.config.num_labels, "get_labels": json.dumps(labels),
            "get_image_shape": json.dumps([1, channels, height, width])}
