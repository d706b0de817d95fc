"""Causal LM task kind: `forward(input_ids [1, n], cache_position [n]) -> logits [1, n, vocab]`, the KV cache held
as buffers, the sequence length dynamic. An app prefills the prompt in one call, then decodes one token per call.

Besides the kind interface (models.methods), two hooks of its own: `texts` (the reference's prompts and greedy
continuations as text) and `app_check` (ExecuTorch's C++ LLM runner generates from the published .pte).
"""

from __future__ import annotations

import inspect
import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from xportbuild.errors import StageError
from xportbuild.models.common import conv1d_as_linear, eos_ids, load_pretrained, text_limit
from xportbuild.models.methods import Call, ExportableMethod, Outcome, greedy_token
from xportbuild.recipe.spec import STOCK_OPS, ExportSpec, VerifyInputs

WHAT = "causal LM"  # in messages: "cannot load <folder> as a <WHAT>"


def export_blocker(config) -> str | None:
    """Why a decoder of this config cannot be exported with a static cache, or None. Read from the config and from
    the cache layers transformers itself builds for it, so every family with a cause is refused for it."""
    from transformers.configuration_utils import get_head_shapes

    from xportbuild.models import state_cache

    text = config.get_text_config(decoder=True)
    model_class = state_cache.causal_lm_class(text)
    if model_class and (flag := _encoder_flag(model_class, text)):
        return (f"its config is an encoder's ({flag} = false), and {model_class.__name__} then attends both ways "
                f"and keeps no cache; it is a masked LM (task \"masked-lm\"), or a decoder once config.json says "
                f"{flag} = true")
    try:
        state_cache.static_layers(text, 2)
    except Exception as err:  # noqa: BLE001  whatever transformers raises: it builds no static cache for this config
        return f"transformers builds no static cache for it ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    if model_class and (reason := state_cache.state_blocker(model_class)):
        return reason
    nope, rope = getattr(text, "qk_nope_head_dim", None), getattr(text, "qk_rope_head_dim", None)
    if nope and rope and nope + rope != get_head_shapes(config)[1]:
        return (f"its multi-head latent attention caches keys qk_nope_head_dim + qk_rope_head_dim = {nope + rope} wide, "
                f"and transformers' static cache sizes every key by head_dim = {get_head_shapes(config)[1]}")
    return None


def _encoder_flag(model_class, config) -> str | None:
    """The config flag that makes this causal-LM head an encoder's when false, if it is false: encoders with a
    causal-LM head (BERT, RoBERTa...) warn or assert on is_decoder (the decoder heads of encoder-decoders set it
    themselves); XLM masks causally only when `causal` is set."""
    if getattr(config, "is_decoder", None) is False and re.search(r"(not|assert) config\.is_decoder",
                                                                  inspect.getsource(model_class.__init__)):
        return "is_decoder"
    if getattr(config, "causal", None) is False:
        return "causal"
    return None


def auto_class(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def load_model(model_dir: Path) -> torch.nn.Module:
    model = load_pretrained(auto_class(model_dir), model_dir, WHAT)
    if reason := export_blocker(model.config):
        raise StageError(f"model_type {model.config.model_type!r} cannot be exported as a causal LM: {reason}")
    conv1d_as_linear(model)
    if model._can_set_experts_implementation():
        # Mixture of experts: every expert as one batched matmul over stock ops (the default grouped_mm calls a
        # transformers custom op that ExecuTorch has no kernel for). Exact, at the cost of computing unused experts.
        model.set_experts_implementation("batched_mm")
    if "position_ids" in inspect.signature(model.forward).parameters:
        model.register_forward_pre_hook(_positions_from_cache, with_kwargs=True)
    return model


class DecoderForward(torch.nn.Module):
    """The exported method, its inputs positional as the .pte's are."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids=input_ids, cache_position=cache_position)


def exportables(model: torch.nn.Module, max_seq_len: int, export: ExportSpec = STOCK_OPS) -> dict[str, ExportableMethod]:
    """`forward` with a static KV cache (and a decoder's state caches) and a dynamic sequence length up to
    max_seq_len - 1 (or one token per call: `export.one_token`); with the recipe's custom ops, attention and cache updates go through ExecuTorch's llama:: ops."""
    from functools import partial

    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    from xportbuild.models import custom_attention, state_cache

    text_limit(model, max_seq_len)
    model.generation_config = GenerationConfig(use_cache=True, cache_implementation="static")
    tracing = nullcontext
    if state_cache.has_state_layers(model.config.get_text_config(decoder=True)):
        decoder = state_cache.StatefulDecoder(model, max_seq_len)  # runs the model once: before custom attention
        if decoder.has_attention:  # else there is no attention for custom ops to take over
            custom_attention.use_custom_ops(model, export)
            decoder.custom_attention = export.custom_sdpa
        tracing = partial(state_cache.fixed_length_scans, model, max_seq_len)
    else:
        custom_attention.use_custom_ops(model, export)
        # The outer wrapper's forward drops cache_position; its inner module is what export traces.
        decoder = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_seq_len).model
    custom_attention.swap_kv_cache(decoder, export)
    if export.one_token:  # for backends that lower fixed shapes: an app prefills token by token
        example = (torch.tensor([[1]], dtype=torch.long), torch.zeros(1, dtype=torch.long))
        return {"forward": ExportableMethod(DecoderForward(decoder).eval(), example, None, tracing)}
    seq_len = torch.export.Dim("seq_len", min=1, max=max_seq_len - 1)
    example = (torch.tensor([[1, 2]], dtype=torch.long), torch.arange(2, dtype=torch.long))
    return {"forward": ExportableMethod(DecoderForward(decoder).eval(), example,
                                       {"input_ids": {1: seq_len}, "cache_position": {0: seq_len}}, tracing)}


def _positions_from_cache(module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Give the model its positions: the cache's start (the caller's cache_position[0]) onwards. Left to itself, a
    model with learned positions (OPT, BioGPT, XGLM) derives them from a mask and slices by the cache's length, which
    export cannot trace; models with rotary positions compute these same values."""
    if kwargs.get("position_ids") is None and kwargs.get("input_ids") is not None and kwargs.get("cache") is not None:
        lengths = [layer.cumulative_length for layer in kwargs["cache"].layers
                   if getattr(layer, "cumulative_length", None) is not None]
        if lengths:  # a decoder of state layers only has no positions to give
            kwargs["position_ids"] = (lengths[0] + torch.arange(kwargs["input_ids"].shape[1])).reshape(1, -1)
    return args, kwargs


def samples(model_dir: Path, model, verify: VerifyInputs) -> list[dict[str, np.ndarray]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    return [{"input_ids": np.array([tokenizer(prompt)["input_ids"]], dtype=np.int64)} for prompt in verify.prompts]


def run(call: Call, sample: dict[str, np.ndarray], facts: dict, max_new_tokens: int,
        forced: list[int] | None = None) -> Outcome:
    """Greedy generation as an app runs it: the prompt in one call, then one call per token. `forced`: the scores at
    each of those tokens, fed them instead of its own choices, in one call (the causal mask gives each position
    exactly the context token-by-token decoding would)."""
    prompt = sample["input_ids"][0].tolist()
    if forced is not None:
        tokens = prompt + forced[:-1]
        logits = call("forward", (torch.tensor([tokens]), torch.arange(len(tokens))))
        scores = logits[0, len(prompt) - 1:].float().numpy()
        return Outcome([int(row.argmax()) for row in scores], list(scores))
    outcome = Outcome([])
    token = greedy_token(call("forward", (torch.tensor([prompt]), torch.arange(len(prompt)))), outcome)
    while len(outcome.tokens) < max_new_tokens:
        position = torch.tensor([len(prompt) + len(outcome.tokens) - 1])
        token = greedy_token(call("forward", (torch.tensor([[token]]), position)), outcome)
    return outcome


def metadata(model: torch.nn.Module, model_dir: Path, max_seq_len: int, export: ExportSpec = STOCK_OPS) -> dict:
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
        "enable_dynamic_shape": not export.one_token,  # else exportables fixes one token per call
        "get_n_layers": config.num_hidden_layers,
        "get_dtype": str(model.dtype).removeprefix("torch."),  # the logits' dtype: what the .pte really returns
    }
    heads = getattr(config, "num_attention_heads", None)
    if heads:  # a decoder of state-space layers only has no attention heads
        metadata["get_n_kv_heads"] = getattr(config, "num_key_value_heads", None) or heads
        metadata["get_head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // heads
    if bos is not None:
        metadata["get_bos_id"] = int(bos)
    return metadata


def texts(model_dir: Path, verify: VerifyInputs, outcomes: list[Outcome]) -> list[dict]:
    """Each prompt with the float model's greedy continuation, as text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    return [{"prompt": prompt, "continuation": tokenizer.decode(outcome.tokens)}
            for prompt, outcome in zip(verify.prompts, outcomes)]


def app_check(pte_path: Path, model_dir: Path, prompt: str, pte_tokens: list[int], facts: dict) -> tuple[dict, str]:
    """Generate with the C++ runner as an app would; its text must be the .pte's greedy text up to an end token.
    Returns the runner's figures and, if an app would not get that text, why ("" if it would).

    Surrounding whitespace is not compared: tokenizers' decoders differ in stripping it, the model does not."""
    from transformers import AutoTokenizer

    from xportbuild import llm_runner

    try:
        figures = llm_runner.generate(pte_path, model_dir / "tokenizer.json", prompt, len(pte_tokens))
    except RuntimeError as err:  # e.g. an empty prompt, or a tokenizer.json the C++ tokenizer cannot read
        error = str(err).strip().splitlines()[0]
        return ({"error": error, "matches_pte_greedy": None},
                f"ExecuTorch's LLM runner could not run the .pte on prompt 0: {error}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    ends = [index for index, token in enumerate(pte_tokens) if token in facts["get_eos_ids"]]
    expected = tokenizer.decode(pte_tokens[: ends[0] if ends else None])
    # The runner streams the end token's own text (e.g. "<eos>") before it stops.
    text = figures.text.removesuffix(tokenizer.decode(pte_tokens[ends[0]])) if ends else figures.text
    matches = text.strip() == expected.strip()
    result = {**figures.as_dict(), "expected": expected, "matches_pte_greedy": matches}
    return result, "" if matches else (f"ExecuTorch's LLM runner generated {figures.text!r} from prompt 0, not the "
                                       f".pte's greedy {expected!r}")
