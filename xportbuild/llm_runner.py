"""Generation with ExecuTorch's own C++ LLM runner, as an app runs a published causal-LM .pte: no torch model load.

The runner reads the .pte's metadata methods (max_seq_len, eos ids, ...), tokenizes with tokenizer.json and
samples in C++. Used by `python -m xportbuild run` and by the verify stage, which records the same figures.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFigures:
    text: str
    prompt_tokens: int
    generated_tokens: int
    load_s: float  # runner construction + program load
    first_token_s: float  # from the start of generation to the first generated token
    prefill_tokens_per_s: float | None  # None when too fast for the runner's millisecond clock
    decode_tokens_per_s: float | None  # tokens after the prefill's, over the time after the prefill

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"load {self.load_s:.2f} s, first token {self.first_token_s * 1000:.0f} ms, prefill "
                f"{_rate(self.prefill_tokens_per_s)} ({self.prompt_tokens} tokens), decode "
                f"{_rate(self.decode_tokens_per_s)} ({self.generated_tokens} tokens)")


def _rate(value: float | None) -> str:
    return "under 1 ms" if value is None else f"{value:.1f} tok/s"


def bos_tokens(tokenizer_path: Path) -> int:
    """How many BOS tokens the tokenizer's own template prepends; the C++ runner must add the same."""
    processor = json.loads(Path(tokenizer_path).read_text()).get("post_processor") or {}
    single = processor.get("single") or []
    return 1 if single and "SpecialToken" in single[0] else 0


def generate(pte_path: Path, tokenizer_path: Path, prompt: str, max_new_tokens: int,
             temperature: float = 0.0, on_piece=None) -> RunFigures:
    """Generate from `prompt` (greedy at temperature 0); `on_piece(text)` sees each piece as it is generated."""
    from xportbuild.runtime import data_file, load_kernels

    load_kernels()
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    started = time.perf_counter()
    runner = TextLLMRunner(str(pte_path), str(tokenizer_path), data_file(pte_path))
    constructed_s = time.perf_counter() - started
    pieces: list[str] = []
    stats = []

    def take(piece: str) -> None:
        pieces.append(piece)
        if on_piece is not None:
            on_piece(piece)

    config = GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=temperature,
                              num_bos=bos_tokens(tokenizer_path), num_eos=0)
    try:
        runner.generate(prompt, config, take, stats.append)
    except UnicodeDecodeError as err:  # the binding passes each piece as str: a byte-level token may be half a char
        raise RuntimeError(f"the runner produced a piece that is not whole UTF-8 ({err.reason} at byte "
                           f"{err.start}); its Python binding cannot pass it on") from err
    return _figures("".join(pieces), json.loads(stats[-1].to_json_string()), constructed_s)


def _figures(text: str, stats: dict, constructed_s: float) -> RunFigures:
    ms = stats["SCALING_FACTOR_UNITS_PER_SECOND"] / 1000.0  # the runner's clock ticks per millisecond
    # The runner loads the program at construction or lazily at the first generate; count both.
    load_s = constructed_s + (stats["model_load_end_ms"] - stats["model_load_start_ms"]) / ms / 1000.0
    prefill_ms = (stats["prompt_eval_end_ms"] - stats["inference_start_ms"]) / ms
    first_ms = (stats["first_token_ms"] - stats["inference_start_ms"]) / ms
    decode_ms = (stats["inference_end_ms"] - stats["prompt_eval_end_ms"]) / ms
    generated = stats["generated_tokens"]

    def rate(count: int, milliseconds: float) -> float | None:
        return count / (milliseconds / 1000.0) if milliseconds > 0 else None

    return RunFigures(text=text, prompt_tokens=stats["prompt_tokens"], generated_tokens=generated, load_s=load_s,
                      first_token_s=first_ms / 1000.0, prefill_tokens_per_s=rate(stats["prompt_tokens"], prefill_ms),
                      decode_tokens_per_s=rate(generated, decode_ms))
