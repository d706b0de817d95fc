"""Loading a fetched model with the Auto class of its kind, honouring the source's remote-code opt-in."""

from __future__ import annotations

import json
from pathlib import Path

from xportbuild.errors import StageError


def load_pretrained(auto_class, model_dir: Path, what: str):
    """The float32 eager model from a fetched folder; remote code runs only if its source opted in."""
    import torch

    from xportbuild.stages.fetch import SOURCE_RECORD

    trust_remote_code = json.loads((model_dir / SOURCE_RECORD).read_text())["trust_remote_code"] is True
    try:
        model = auto_class.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                           use_safetensors=True)
    except ValueError as err:
        raise StageError(f"cannot load {model_dir} as a {what}: {err}") from err
    return model.eval()


def conv1d_as_linear(model) -> None:
    """transformers' Conv1D (GPT-2 and its kin) is a linear layer with its weight stored transposed: replace each by the
    nn.Linear it stands for, so that quantization finds it and XNNPACK lowers it as a linear."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.nx, child.nf, bias=child.bias is not None, dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, name, linear)


def text_limit(model, max_seq_len: int) -> None:
    """max_seq_len must fit the text model's positions."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and max_seq_len > limit:
        raise StageError(f"max_seq_len = {max_seq_len} exceeds the model's max_position_embeddings ({limit}): "
                         "lower max_seq_len in the model file")


def attach_static_cache(module, config, max_cache_len: int):
    """A StaticCache of `max_cache_len` positions whose tensors are `module`'s buffers, so that torch.export keeps the
    cache inside the program (updated in place) instead of taking it as an input."""
    import torch
    from transformers import StaticCache
    from transformers.configuration_utils import get_head_shapes

    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    heads, head_dim = get_head_shapes(config)
    cache.early_initialization(1, heads, head_dim, torch.float32, torch.device("cpu"))
    for index, layer in enumerate(cache.layers):
        module.register_buffer(f"key_cache_{index}", layer.keys, persistent=False)
        module.register_buffer(f"value_cache_{index}", layer.values, persistent=False)
        module.register_buffer(f"cumulative_length_{index}", layer.cumulative_length, persistent=False)
    return cache


def start_at(cache, cache_position) -> None:
    """Positions come from the cache's length: set it from the caller's position, so a new sequence starts at 0."""
    for layer in cache.layers:
        layer.cumulative_length.copy_(cache_position[0])


def eos_ids(model) -> list[int]:
    """End-of-sequence ids: generation_config's list merged with the (text) config's."""
    ids: list[int] = []
    for value in (model.generation_config.eos_token_id, model.config.get_text_config(decoder=True).eos_token_id):
        for token in value if isinstance(value, list) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids
