"""Loading a model folder with transformers as data: never its own code, every weight from the checkpoint."""

from __future__ import annotations

from pathlib import Path

from xportbuild.errors import SourceError, StageError

# Shown per problem before "and N more": enough to recognise a pattern (one layer, every bias) in one line.
_NAMED = 4


def load_pretrained(auto_class, model_dir: Path, what: str, weights: bool = True, label: str = "the checkpoint"):
    """The float32 eager model of a model folder. Code the folder ships is never run, and every weight the class
    expects must come from the checkpoint, finite: transformers would otherwise initialise what is missing at random,
    and a random model agrees perfectly with its own random `.pte`. `weights=False` builds it on the meta device,
    reading only the checkpoint's names and shapes: validate's check, before any build. `label` names the checkpoint
    in messages (a stage's task already names its model; validate names the source)."""
    import torch

    placement = {} if weights else {"device_map": "meta"}
    try:
        # Shapes that differ are reported by name below (transformers would raise a pointer to its log instead).
        model, loading = auto_class.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False,
                                                    use_safetensors=True, output_loading_info=True,
                                                    ignore_mismatched_sizes=True, **placement)
    except (ValueError, OSError, KeyError, RuntimeError, TypeError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise StageError(f"cannot load {label} as a {what}: {type(err).__name__}: {first}") from err
    if problem := checkpoint_problem(loading):
        raise SourceError(f"{label} {problem}")
    if weights and (damaged := [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]):
        raise SourceError(f"{label} holds weights with NaN or infinite values: {_some(damaged)}; it is damaged: "
                          "re-download or re-save it")
    return model.eval()


def checkpoint_problem(loading: dict) -> str | None:
    """Weights the model's class expects that the checkpoint lacks, or holds under names the class has not."""
    found = [f"{label} {_some(sorted(str(key if isinstance(key, str) else key[0]) for key in loading.get(name) or ()))}"
             for name, label in (("missing_keys", "missing"), ("unexpected_keys", "not in the model's class"),
                                 ("mismatched_keys", "of another shape"))
             if loading.get(name)]
    if not found:
        return None
    return (f"does not match its model class: weights {'; '.join(found)}; every weight must come from the "
            "checkpoint (a missing one would be random): re-save the model whole")


def _some(names: list) -> str:
    shown = ", ".join(str(name) for name in names[:_NAMED])
    return shown + (f" and {len(names) - _NAMED} more" if len(names) > _NAMED else "")


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
