"""Causal LM task kind: load, wrap with a static KV cache for export, and run step functions.

Every runner of a causal LM program (eager wrapper, ExportedProgram, .pte method) is driven through
one `Step`: (input_ids [1, n], cache_position [n]) -> logits [1, n, vocab].
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from xportbuild.errors import StageError
from xportbuild.models.common import conv1d_as_linear, eos_ids, load_pretrained, text_limit
from xportbuild.recipe.spec import ExportSpec

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("forward",)
STOCK_OPS = ExportSpec()  # the model's own attention and cache ops


def load_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = load_pretrained(AutoModelForCausalLM, model_dir, "causal LM")
    conv1d_as_linear(model)
    if model._can_set_experts_implementation():
        # Mixture of experts: every expert as one batched matmul over stock ops (the default grouped_mm calls a
        # transformers custom op that ExecuTorch has no kernel for). Exact, at the cost of computing unused experts.
        model.set_experts_implementation("batched_mm")
    if "position_ids" in inspect.signature(model.forward).parameters:
        model.register_forward_pre_hook(_positions_from_cache, with_kwargs=True)
    return model


def exportable(model: torch.nn.Module, max_seq_len: int, export: ExportSpec = STOCK_OPS) -> torch.nn.Module:
    """The module exported as `forward(input_ids, cache_position)`, KV cache held as buffers; with the recipe's
    custom ops, attention and cache updates go through ExecuTorch's llama:: ops."""
    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    from xportbuild.models import custom_attention

    text_limit(model, max_seq_len)
    model.generation_config = GenerationConfig(use_cache=True, cache_implementation="static")
    custom_attention.use_custom_ops(model, export)
    wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_seq_len)
    # The outer wrapper's forward drops cache_position; its inner module is what export traces.
    custom_attention.swap_kv_cache(wrapper.model, export)
    return wrapper.model


def _positions_from_cache(module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Give the model its positions: the cache's start (the caller's cache_position[0]) onwards. Left to itself, a
    model with learned positions (OPT, BioGPT, XGLM) derives them from a mask and slices by the cache's length, which
    export cannot trace; models with rotary positions compute these same values."""
    if kwargs.get("position_ids") is None and kwargs.get("input_ids") is not None and kwargs.get("cache") is not None:
        start = kwargs["cache"].layers[0].cumulative_length
        kwargs["position_ids"] = (start + torch.arange(kwargs["input_ids"].shape[1])).reshape(1, -1)
    return args, kwargs


def export_methods(module: torch.nn.Module, max_seq_len: int,
                   export: ExportSpec = STOCK_OPS) -> dict[str, torch.export.ExportedProgram]:
    """torch.export of every method, with a dynamic sequence length up to max_seq_len - 1; a custom op the
    recipe asks for must be in the graph."""
    from xportbuild.models.custom_attention import llama_op_counts, missing_ops

    example = torch.tensor([[1, 2]], dtype=torch.long)
    seq_len = torch.export.Dim("seq_len", min=1, max=max_seq_len - 1)
    try:
        with torch.no_grad():
            program = torch.export.export(
                module,
                args=(),
                kwargs={"input_ids": example, "cache_position": torch.arange(2, dtype=torch.long)},
                dynamic_shapes={"input_ids": {1: seq_len}, "cache_position": {0: seq_len}},
                strict=True,
            )
    except Exception as err:  # torch.export raises many unrelated types; the user needs the method and reason
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StageError(f"{type(module).__name__}: method forward is not exportable: {reason}") from err
    if missing := missing_ops(llama_op_counts(program), export.custom_ops):
        raise StageError(f"export: {', '.join(missing)} requested by the recipe but absent from method forward: "
                         f"this model's attention does not go through transformers' attention interface")
    return {"forward": program}


def runner_metadata(model: torch.nn.Module, max_seq_len: int, export: ExportSpec) -> dict:
    """The constant methods ExecuTorch's LLM runner reads (its runner/constants.h names), plus model facts.

    Read from the model's own config, not derived: head_dim is the config's (Gemma 3: 256, not hidden / heads),
    and the end-of-sequence ids merge generation_config.json's list with config.json's.
    """
    config = model.config.get_text_config()
    bos = config.bos_token_id if config.bos_token_id is not None else model.generation_config.bos_token_id
    metadata = {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_seq_len,
        "get_vocab_size": config.vocab_size,
        "get_eos_ids": eos_ids(model),
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": export.custom_sdpa,
        "enable_dynamic_shape": True,  # export_methods makes the sequence length dynamic
        "get_n_layers": config.num_hidden_layers,
        "get_n_kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "get_head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
    }
    if bos is not None:
        metadata["get_bos_id"] = int(bos)
    return metadata


def output_dtype(program: torch.export.ExportedProgram) -> str:
    """The dtype the program computes its logits in, e.g. "float32": what the .pte really returns."""
    output = next(node for node in program.graph.nodes if node.op == "output")
    first = output.args[0][0] if isinstance(output.args[0], (list, tuple)) else output.args[0]
    return str(first.meta["val"].dtype).removeprefix("torch.")


def module_step(module: torch.nn.Module) -> Step:
    def step(input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(input_ids=input_ids, cache_position=cache_position)

    return step


def teacher_forced_logits(step: Step, prompt: list[int], continuation: list[int]) -> np.ndarray:
    """Logits at every position of prompt + continuation[:-1], in one call: `forward` takes a dynamic sequence
    length, and a causal mask gives each position exactly the context token-by-token decoding would."""
    tokens = prompt + continuation[:-1]
    return step(torch.tensor([tokens]), torch.arange(len(tokens)))[0].float().numpy()


def greedy(step: Step, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt` (argmax at each step)."""
    logits = step(torch.tensor([prompt]), torch.arange(len(prompt)))
    tokens = [int(logits[0, -1].argmax())]
    while len(tokens) < max_new_tokens:
        position = torch.tensor([len(prompt) + len(tokens) - 1])
        logits = step(torch.tensor([[tokens[-1]]]), position)
        tokens.append(int(logits[0, -1].argmax()))
    return tokens
