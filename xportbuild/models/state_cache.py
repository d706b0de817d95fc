"""Decoders whose cache layers keep a state: convolution states, state-space states and linear-attention states,
beside or instead of a key/value cache (LFM2, Qwen3-Next, Granite 4, Nemotron-H, Zamba 2...).

transformers' own cache layer classes hold those states (`LinearAttentionLayer` and its hybrids with static
attention layers); here they become buffers of the exported method, written in place as the key/value cache is:
- each state is made once by running the model on two tokens (its shape is the layer's business), then zeroed;
- every layer reports a previous state from then on, so the model takes its carried-state path for any number
  of tokens (prefill at position 0 over a zero state is the same as prefill without one);
- a call that starts at position 0 starts a new sequence: the states are zeroed first, as the key/value cache is
  overwritten from 0, so an app runs one conversation after another on the same loaded program;
- the chunked scans transformers runs for a multi-token call (gated delta rule, Mamba 2's chunk scan) loop over
  `ceil(tokens / chunk)` chunks, a count torch.export cannot keep dynamic: while a method is traced they see the
  sequence padded to a fixed length with tokens that leave the state as it is (`fixed_length_scans`).
"""

from __future__ import annotations

import inspect
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from xportbuild.models.custom_attention import POSITIONS_KWARG


def state_layer_class():
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    return LinearAttentionCacheLayerMixin


def has_state_layers(config) -> bool:
    """Whether transformers' cache for this (text) config holds state layers beside or instead of key/value ones."""
    return any(isinstance(layer, state_layer_class()) for layer in static_layers(config, 2))


def static_layers(config, max_cache_len: int) -> list:
    """transformers' static cache layers for the config, sliding windows kept at full length (as its own exportable
    wrappers do: a window's ring buffer has control flow export cannot trace)."""
    from transformers import StaticCache
    from transformers.cache_utils import (LinearAttentionAndStaticFullAttentionLayer,
                                          LinearAttentionAndStaticSlidingWindowAttentionLayer, StaticLayer,
                                          StaticSlidingWindowLayer)

    layers = StaticCache(config=config, max_cache_len=max_cache_len).layers
    for index, layer in enumerate(layers):
        if isinstance(layer, LinearAttentionAndStaticSlidingWindowAttentionLayer):
            layers[index] = LinearAttentionAndStaticFullAttentionLayer(max_cache_len, layer.number_of_states)
        elif isinstance(layer, StaticSlidingWindowLayer) and not isinstance(layer, state_layer_class()):
            layers[index] = StaticLayer(max_cache_len)
    return layers


class StatefulDecoder(torch.nn.Module):
    """`forward(input_ids, cache_position) -> logits` over a static cache whose state layers are buffers."""

    def __init__(self, model: torch.nn.Module, max_cache_len: int):
        from transformers.cache_utils import Cache

        super().__init__()
        self.model = model
        # Positions from the caller: a cache of state layers only has no length to derive them from.
        self.takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        self.custom_attention = False  # set when custom_sdpa attends: it reads the positions by name
        self.cache = Cache(layers=static_layers(model.config.get_text_config(decoder=True), max_cache_len))
        with torch.no_grad():  # every layer makes its states (and key/value tensors) at their shapes
            self.model(input_ids=torch.zeros((1, 2), dtype=torch.long), cache=self.cache, use_cache=True,
                       **({"position_ids": torch.arange(2).unsqueeze(0)} if self.takes_positions else {}))
        for index, layer in enumerate(self.cache.layers):
            self._register(index, layer)

    def _register(self, index: int, layer) -> None:
        if getattr(layer, "keys", None) is not None:
            layer.keys.zero_()
            layer.values.zero_()
            self.register_buffer(f"key_cache_{index}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{index}", layer.values, persistent=False)
        if getattr(layer, "cumulative_length", None) is not None:
            layer.cumulative_length.zero_()
            self.register_buffer(f"cumulative_length_{index}", layer.cumulative_length, persistent=False)
        if not isinstance(layer, state_layer_class()):
            return
        for state in range(layer.number_of_states):
            for kind, states in (("conv", layer.conv_states), ("recurrent", layer.recurrent_states)):
                if states[state] is not None:
                    states[state].zero_()
                    self.register_buffer(f"{kind}_state_{index}_{state}", states[state], persistent=False)
            layer.has_previous_state[state] = True

    def state_buffers(self) -> list[torch.Tensor]:
        return [buffer for name, buffer in self.named_buffers(recurse=False) if "_state_" in name]

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                cache_position: torch.Tensor | None = None) -> torch.Tensor:
        continuing = cache_position[:1] > 0
        for state in self.state_buffers():
            state.copy_(torch.where(continuing, state, torch.zeros((), dtype=state.dtype)))
        for layer in self.cache.layers:
            if getattr(layer, "cumulative_length", None) is not None:
                layer.cumulative_length.copy_(cache_position[0])
        positions = {"position_ids": cache_position.unsqueeze(0)} if self.takes_positions else {}
        if self.custom_attention:
            positions[POSITIONS_KWARG] = cache_position.unsqueeze(0)
        outputs = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=None, cache=self.cache,
                             use_cache=True, **positions)
        return outputs.logits

    @property
    def has_attention(self) -> bool:
        return any(getattr(layer, "keys", None) is not None and layer.keys.numel() for layer in self.cache.layers)


# The chunked scans of transformers' modeling files, by function name: which arguments run along the sequence (their
# sequence dim). A padding token takes in each the value that leaves the carried state as it is:
# - gated delta rule (Qwen3-Next, Qwen3.5, OLMo hybrid...) and Kimi delta attention, [batch, seq, heads, dim] inputs:
#   a log decay `g` of 0 keeps the state, a key and beta of 0 write nothing;
# - Mamba 2's chunk scan (Bamba, Falcon-H1, Granite 4, Nemotron-H, Zamba 2): an input and B of 0 write nothing; the
#   raw time step passes through its bias and softplus, so it is padded with the raw value that comes out as 0. A
#   clamp to a least time step (Nemotron-H) makes it that least step instead: each padding token then decays the
#   state by exp(A * step), which is undone on the final state (`_undo_padding_decay`).
CHUNKED_SCANS = {
    "torch_chunk_gated_delta_rule": {"query": 1, "key": 1, "value": 1, "g": 1, "beta": 1},
    "chunk_kimi_delta_attention": {"query": 1, "key": 1, "value": 1, "g": 1, "beta": 1},
    "mamba2_chunk_scan": {"hidden_states": 1, "dt": 1, "B": 1, "C": 1},
}


def _padding_value(name: str, arguments: dict):
    if name != "dt":
        return 0.0
    if arguments.get("dt_softplus"):
        return -math.inf  # softplus(-inf) = 0
    bias = arguments.get("dt_bias")
    return 0.0 if bias is None else -bias  # dt + dt_bias = 0


def _least_time_step(arguments: dict) -> float:
    return float(arguments.get("dt_limit", (0.0, math.inf))[0]) if "dt" in arguments else 0.0


def _undo_padding_decay(result, arguments: dict, padding: int):
    """Mamba 2's final state, as if the `padding` tokens (each a least time step long, writing nothing) were not
    there: the state of head h decayed by exp(A[h] * step * padding), multiplied back."""
    if not isinstance(result, tuple) or not (step := _least_time_step(arguments)):
        return result
    output, final_state, *rest = result
    growth = torch.exp(-arguments["A"].float() * (step * padding)).to(final_state.dtype)
    return (output, final_state * growth.reshape(1, -1, *([1] * (final_state.dim() - 2))), *rest)


def _pad_along(tensor: torch.Tensor, dim: int, length: int, value) -> torch.Tensor:
    """The tensor followed by `value` up to `length` along `dim`. The fill is `length` long and the result cut back
    to `length`: a fill of `length - tokens` would be sized by the runtime's memory plan for the fewest tokens
    torch.export assumes (2), one short of a decode step's."""
    shape = list(tensor.shape)
    shape[dim] = length
    if isinstance(value, torch.Tensor):  # one value per head, the last dim: broadcast over the padding tokens
        fill = value.to(tensor.dtype).expand(shape)
    else:
        fill = torch.full(shape, value, dtype=tensor.dtype)
    return torch.cat([tensor, fill], dim=dim).narrow(dim, 0, length)


def _fixed_length(kernel, sequence_args: dict[str, int], max_tokens: int):
    signature = inspect.signature(kernel)

    def padded(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        values = arguments.arguments
        first = next(iter(sequence_args))
        tokens = values[first].shape[sequence_args[first]]
        chunk = values.get("chunk_size") or 64
        length = math.ceil(max_tokens / chunk) * chunk
        for name, dim in sequence_args.items():
            if values.get(name) is not None:
                values[name] = _pad_along(values[name], dim, length, _padding_value(name, values))
        result = _undo_padding_decay(kernel(*arguments.args, **arguments.kwargs), values, length - tokens)
        if isinstance(result, tuple):
            return (result[0].narrow(1, 0, tokens), *result[1:])
        return result.narrow(1, 0, tokens)

    return padded


@contextmanager
def fixed_length_scans(model: torch.nn.Module, max_tokens: int):
    """While the block runs, the chunked scans of the model's modeling module see at most `max_tokens` tokens padded
    to a whole number of chunks: one chunk count for every call, so a single program serves every length."""
    module = sys.modules[type(model).__module__]
    stock = {name: getattr(module, name) for name in CHUNKED_SCANS if callable(getattr(module, name, None))}
    for name, kernel in stock.items():
        setattr(module, name, _fixed_length(kernel, CHUNKED_SCANS[name], max_tokens))
    try:
        yield
    finally:
        for name, kernel in stock.items():
            setattr(module, name, kernel)


def causal_lm_class(config):
    """The transformers class that the config's causal LM is (its module defines its layers, kernels and caches)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    return getattr(transformers, name, None) if name else None


def state_blocker(model_class) -> str | None:
    """Why decoders of this class cannot carry their state through one exported method, or None: read from the
    class and its module's own definitions, so every family built the same way gets the same answer."""
    from transformers.cache_utils import Cache

    if not {"cache", "past_key_values"} & set(inspect.signature(model_class.forward).parameters):
        return (f"{model_class.__name__} takes no transformers cache: it passes its state in and out of each call "
                "itself, and the exported method keeps the state as buffers of a transformers cache")
    module = sys.modules[model_class.__module__]
    classes = [value for value in vars(module).values()
               if isinstance(value, type) and value.__module__ == module.__name__]
    own_caches = sorted(cls.__name__ for cls in classes if issubclass(cls, Cache) or cls.__name__.endswith("Cache"))
    if own_caches:
        return (f"it keeps its state in a cache class of its own ({', '.join(own_caches)}) that the model requires "
                "instead of transformers' cache layers, which the exported method holds as buffers")
    module_states = sorted(cls.__name__ for cls in classes if "_setup_cache" in vars(cls))
    if module_states:
        return (f"it keeps its recurrent state in attributes of its own layers ({', '.join(module_states)}."
                "_setup_cache), outside transformers' cache layers, which the exported method holds as buffers")
    for name, function in vars(module).items():
        if not inspect.isfunction(function) or function.__module__ != module.__name__:
            continue
        parameters = inspect.signature(function).parameters
        returns_state = any(p in parameters for p in ("return_last_state", "return_final_states", "output_final_state"))
        if returns_state and not any(p.startswith("initial_state") for p in parameters):
            return (f"its sequence scan {name} ({Path(module.__file__).name}) starts from a zero state (it takes no "
                    "initial state), so a call after the first would drop the state the previous calls left")
    return None
