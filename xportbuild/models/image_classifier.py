"""Image classification kind: `forward(pixel_values) -> logits` at the model's input size.

Verification images are generated (smooth gradients and stripes, deterministic per index), already in the
normalized range a processor produces: nothing is fetched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from xportbuild.models import inputs
from xportbuild.models.common import load_pretrained
from xportbuild.models.methods import Call, ExportableMethod, Outcome
from xportbuild.recipe.spec import STOCK_OPS, ExportSpec, VerifyInputs

WHAT = "image classifier"  # in messages: "cannot load <folder> as a <WHAT>"


class ClassifierForward(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def auto_class(model_dir: Path):
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification


def load_model(model_dir: Path):
    return load_pretrained(auto_class(model_dir), model_dir, WHAT)


def image_shape(model) -> tuple[int, int, int]:
    return inputs.image_shape(model.config, model.name_or_path)


def exportables(model, max_seq_len: int, export: ExportSpec = STOCK_OPS) -> dict[str, ExportableMethod]:
    example = torch.from_numpy(inputs.generated_image(0, image_shape(model)))
    return {"forward": ExportableMethod(ClassifierForward(model).eval(), (example,))}


def samples(model_dir: Path, model, verify: VerifyInputs) -> list[dict[str, np.ndarray]]:
    shape = image_shape(model)
    return [{"pixel_values": inputs.generated_image(index, shape)} for index in range(verify.samples)]


def run(call: Call, sample: dict[str, np.ndarray], facts: dict, max_new_tokens: int,
        forced: list[int] | None = None) -> Outcome:
    scores = call("forward", (torch.from_numpy(sample["pixel_values"]),))[0].float().numpy()
    return Outcome([int(scores.argmax())], [scores])


def metadata(model, model_dir: Path, max_seq_len: int, export: ExportSpec = STOCK_OPS) -> dict:
    channels, height, width = image_shape(model)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return {"get_num_labels": model.config.num_labels, "get_labels": json.dumps(labels),
            "get_image_shape": json.dumps([1, channels, height, width])}
