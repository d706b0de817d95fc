"""Decoder tokens/s of an encoder-decoder .pte whose cross-attention keys and values are computed once per input (the
seq2seq kind's methods) against one that recomputes them from the encoder's hidden states at every decoder call
(what the kind exported before), both lowered to XNNPACK in float32, one run, on the same machine.

    python tests/bench/cross_attention.py            # the tiny test models and Whisper tiny's shape (random weights)

Whisper tiny's shape (1500 encoder positions, 4 decoder layers of width 384, 51865 tokens) shows what a real
checkpoint gains; its weights cannot be had offline, and the speed does not depend on their values.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

STEPS = 24


class RecomputingDecoder(torch.nn.Module):
    """The decoder taking the encoder's hidden states and projecting them to keys and values at every call."""

    def __init__(self, model, max_cache_len: int):
        super().__init__()
        from xportbuild.models.common import attach_static_cache

        self.model = model
        self.static_cache = attach_static_cache(self, model.config.get_text_config(decoder=True), max_cache_len)

    def forward(self, decoder_input_ids, encoder_hidden_states, cache_position):
        from transformers import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        from xportbuild.models.common import start_at

        start_at(self.static_cache, cache_position)
        cache = EncoderDecoderCache(self.static_cache, DynamicCache())
        return self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
                          decoder_input_ids=decoder_input_ids, past_key_values=cache, use_cache=True).logits


def _pte(module, example: tuple, folder: Path, name: str):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    with torch.no_grad():
        program = torch.export.export(module, example, strict=True)
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    path = folder / f"{name}.pte"
    path.write_bytes(lowered.buffer)
    return _load_for_executorch(str(path))


def _tokens_per_s(pte, first_input: torch.Tensor, start: int) -> float:
    token = torch.tensor([[start]])
    pte.run_method("forward", (token, first_input, torch.tensor([0])))  # warm-up
    started = time.perf_counter()
    for position in range(STEPS):
        logits = pte.run_method("forward", (token, first_input, torch.tensor([position])))[0]
        token = logits[:, -1:].argmax(-1)
    return STEPS / (time.perf_counter() - started)


def measure(name: str, folder: Path) -> None:
    from xportbuild.models import seq2seq

    model = seq2seq.load_model(folder)
    exportables = seq2seq.exportables(model, STEPS + 2)
    example = exportables["encoder"].example[0]
    start = exportables["text_decoder"].example[0]
    with torch.no_grad():
        cross_attention = exportables["encoder"].module(example)
        hidden = model.get_encoder()(**{model.main_input_name: example}).last_hidden_state
    with tempfile.TemporaryDirectory() as scratch:
        once = _pte(exportables["text_decoder"].module, (start, cross_attention, torch.tensor([0])), Path(scratch), "once")
        again = _pte(RecomputingDecoder(model, STEPS + 2).eval(), (start, hidden, torch.tensor([0])), Path(scratch),
                     "again")
        before, after = _tokens_per_s(again, hidden, int(start)), _tokens_per_s(once, cross_attention, int(start))
    print(f"| {name} | {hidden.shape[1]} | {before:.1f} | {after:.1f} | {after / before:.2f} |")


def _whisper_tiny_shape(folder: Path) -> Path:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    config = WhisperConfig(vocab_size=51865, d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                           decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536, num_mel_bins=80,
                           max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50258,
                           eos_token_id=50257, pad_token_id=50257, bos_token_id=50257, begin_suppress_tokens=None,
                           suppress_tokens=None)
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


def main() -> None:
    from tests import tiny

    print(f"decoder tokens/s over {STEPS} greedy steps, XNNPACK float32, one run")
    print("| model | encoder positions | recomputed per call | computed once | ratio |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        measure("tiny T5", tiny.save_seq2seq(root / "t5", "t5"))
        measure("tiny Whisper", tiny.save_speech(root / "whisper", "whisper"))
        measure("Whisper tiny's shape", _whisper_tiny_shape(root / "whisper-tiny"))


if __name__ == "__main__":
    main()
