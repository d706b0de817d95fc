"""ExecuTorch's custom attention ops for a causal LM's export: `llama::update_cache` writes the KV cache and
`llama::custom_sdpa` attends over it, both in ExecuTorch's [batch, position, head, dim] cache layout.

Registered with transformers only when a recipe asks for them (`use_custom_ops`), inside the stage that exports.
Sliding-window layers (Gemma 3: five of six) keep their window: the cache is full length, as in transformers'
own exportable wrapper, and custom_sdpa gets an explicit window mask once the cache is longer than the window.
"""

from __future__ import annotations

from collections import Counter

import torch

from xportbuild.recipe.spec import ExportSpec

ATTENTION_NAME = "xportbuild_custom_sdpa"


def import_llama_ops() -> None:
    """Register ExecuTorch's llama:: ops (AOT and runtime kernels).

    executorch's custom_ops module probes for its ops inside a bare `except:`, which swallows a Ctrl-C that
    lands during the probe (the build then runs on and exits 0). Hold SIGINT during the import, deliver it after."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _start_position(positions: torch.Tensor, cache_length: int):
    start = positions[0, 0].item()
    torch._check_is_size(start)
    torch._check(start < cache_length)
    return start


# The name under which a decoder passes its positions to custom_sdpa, for models whose layers do not pass their
# `position_ids` on to attention (Granite 4, Zamba): extra keyword arguments of a model's call reach its attention.
POSITIONS_KWARG = "attention_positions"


def custom_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                **kwargs):
    """transformers attention function: query [b, heads, q, dim]; key/value are the custom cache [b, len, kv, dim]."""
    cache_length = key.shape[1]
    positions = kwargs.get("position_ids")
    start = _start_position(positions if positions is not None else kwargs[POSITIONS_KWARG], cache_length)
    query = query.transpose(1, 2).contiguous()
    if sliding_window is not None and sliding_window < cache_length:
        distance = (torch.arange(query.shape[1]) + start)[:, None] - torch.arange(cache_length)[None, :]
        mask = torch.where((distance >= 0) & (distance < sliding_window), 0.0, float("-inf")).to(torch.float32)
        return torch.ops.llama.custom_sdpa(query, key, value, start, mask, 0.0, False, scaling), None
    return torch.ops.llama.custom_sdpa(query, key, value, start, None, 0.0, True, scaling), None


def _no_mask(*args, **kwargs):
    return None  # custom_sdpa builds its own causal (and window) mask


def _layer_class():
    from transformers.cache_utils import StaticLayer

    class CustomOpKVLayer(StaticLayer):
        """A full-length static cache layer in [b, len, kv heads, dim] layout, written by llama::update_cache.

        `stock_layout` returns [b, heads, len, dim] views for attention implementations other than custom_sdpa."""

        stock_layout = False

        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            # Fresh tensors: a transposed .contiguous() keeps odd strides on size-1 dims (one KV head), which
            # ExecuTorch reads as a non-contiguous dim order and update_cache rejects.
            shape = (self.batch_size, self.max_cache_len, self.num_heads)
            self.keys = torch.zeros(*shape, self.k_head_dim, dtype=self.keys.dtype)
            self.values = torch.zeros(*shape, self.v_head_dim, dtype=self.values.dtype)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start = self.cumulative_length.item()
            torch._check_is_size(start)
            torch._check(start < self.max_cache_len)
            torch.ops.llama.update_cache(key_states.transpose(1, 2).contiguous(), self.keys, start)
            torch.ops.llama.update_cache(value_states.transpose(1, 2).contiguous(), self.values, start)
            self.cumulative_length.add_(key_states.shape[-2])
            if self.stock_layout:
                return self.keys.transpose(1, 2), self.values.transpose(1, 2)
            return self.keys, self.values

    return CustomOpKVLayer


def _hybrid_layer_class(kv_layer):
    """A CustomOpKVLayer (`kv_layer`) that also keeps a layer's linear-attention states (Zamba 2's hybrid layers), as
    transformers' own LinearAttentionAndStaticFullAttentionLayer pairs them with a StaticLayer."""
    from transformers.cache_utils import LinearAttentionLayer

    class CustomOpHybridLayer(LinearAttentionLayer, kv_layer):
        def __init__(self, max_cache_len: int, number_of_states: int = 1):
            kv_layer.__init__(self, max_cache_len)
            LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

        def lazy_initialization(self, *args, **kwargs):
            if args:  # key and value states, as `update` passes them
                kv_layer.lazy_initialization(self, *args)
            else:
                LinearAttentionLayer.lazy_initialization(self, **kwargs)

    return CustomOpHybridLayer


# What a linear-attention cache layer holds besides keys and values: carried over when its keys move to the custom op.
_STATE_ATTRIBUTES = ("conv_states", "recurrent_states", "is_conv_states_initialized", "is_recurrent_states_initialized",
                     "has_previous_state", "conv_kernel_size", "device", "dtype", "record_past")


def use_custom_ops(model: torch.nn.Module, export: ExportSpec) -> None:
    """Before wrapping: route the model's attention through custom_sdpa (registered here, not at import)."""
    if not export.custom_sdpa:
        return
    from transformers import AttentionInterface, AttentionMaskInterface

    import_llama_ops()

    AttentionInterface.register(ATTENTION_NAME, custom_sdpa)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
    model.set_attn_implementation(ATTENTION_NAME)


def swap_kv_cache(wrapper: torch.nn.Module, export: ExportSpec) -> None:
    """After wrapping: replace each static cache layer (and its registered buffers) by a CustomOpKVLayer; a layer
    with linear-attention states keeps them (the same tensors, already buffers of the wrapper)."""
    if not export.custom_kv_cache:
        return
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    import_llama_ops()

    kv_layer = _layer_class()
    hybrid_layer = _hybrid_layer_class(kv_layer)
    cache = wrapper.static_cache if hasattr(wrapper, "static_cache") else wrapper.cache
    for index, layer in enumerate(cache.layers):
        if not getattr(layer, "max_cache_len", 0) or getattr(layer, "keys", None) is None:
            continue  # a KV-sharing layer that never reads its own cache, or a layer of states only
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            replacement = hybrid_layer(layer.max_cache_len, layer.number_of_states)
            for name in _STATE_ATTRIBUTES:
                setattr(replacement, name, getattr(layer, name))
        else:
            replacement = kv_layer(layer.max_cache_len)
        replacement.stock_layout = not export.custom_sdpa
        replacement.lazy_initialization(layer.keys[:, :, :1], layer.values[:, :, :1])
        cache.layers[index] = replacement
        wrapper.register_buffer(f"key_cache_{index}", replacement.keys, persistent=False)
        wrapper.register_buffer(f"value_cache_{index}", replacement.values, persistent=False)
        wrapper.register_buffer(f"cumulative_length_{index}", replacement.cumulative_length, persistent=False)


def llama_op_counts(program) -> Counter:
    """How many times each llama:: op (by name, e.g. "custom_sdpa") is called in a program's graph."""
    return Counter(str(node.target).split(".")[1] for node in program.graph.nodes
                   if node.op == "call_function" and str(node.target).startswith("llama."))


def missing_ops(counts: Counter, requested: tuple[str, ...]) -> list[str]:
    """Requested custom ops absent from a graph whose llama:: op counts are `counts`."""
    return [f"llama::{op}" for op in requested if not counts[op]]
