"""How close a model's outputs are to the float reference: the numbers every stage reports.

Outputs are compared on the float model's recorded calls (a decoder fed the float outcome: every position on the
same context). Means are pooled over positions; their uncertainty comes from a bootstrap over samples, since
positions of one prompt share their context and are not independent samples."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np


@contextmanager
def one_thread():
    """Compute numbers that are stored, and so hashed into downstream keys, on one torch thread: a reduction split
    over threads rounds differently, and the same stage must write the same bytes whatever OMP_NUM_THREADS says."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compare_logits(actual: np.ndarray, expected: np.ndarray) -> dict:
    """Row-wise cosine, top-1 agreement, max abs error and KL(expected || actual) of [positions, vocab] arrays."""
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    dot = (actual * expected).sum(-1)
    norms = np.linalg.norm(actual, axis=-1) * np.linalg.norm(expected, axis=-1)
    cosine = dot / np.maximum(norms, 1e-12)
    return {
        "positions": len(cosine),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "top1": float((actual.argmax(-1) == expected.argmax(-1)).mean()),
        "max_abs": float(np.abs(actual - expected).max()),
        "kl_mean": float(kl_divergence(expected, actual).mean()),
    }


def position_kl(actual: list[np.ndarray | None], expected: list[np.ndarray | None], methods: list[str],
                logit_methods: tuple[str, ...]) -> list[float]:
    """KL(expected || actual) at every position of one sample's calls of its logit methods, in call order: what the
    report plots along the sequence."""
    rows: list[float] = []
    for output, reference, method in zip(actual, expected, methods):
        if output is not None and reference is not None and method in logit_methods:
            flat = [array.reshape(-1, array.shape[-1]).astype(np.float64) for array in (reference, output)]
            rows.extend(float(value) for value in kl_divergence(*flat).round(5))
    return rows


def compare_outputs(actual: np.ndarray, expected: np.ndarray, logits: bool) -> dict:
    """compare_logits for scores over a vocabulary or labels; for other outputs (hidden states, embeddings) only
    the row-wise cosine and the max abs error mean something."""
    actual, expected = actual.reshape(-1, actual.shape[-1]), expected.reshape(-1, expected.shape[-1])
    if logits:
        return compare_logits(actual, expected)
    numbers = compare_logits(actual, expected)
    return {name: numbers[name] for name in ("positions", "cosine_mean", "cosine_min", "max_abs")}


def sample_quality(actual: list[np.ndarray | None], expected: list[np.ndarray | None], methods: list[str],
                   logit_methods: tuple[str, ...]) -> dict[str, dict]:
    """Per method, one sample's outputs against expected ones, call by call (as `methods.replay` returns them;
    None where a call was not made), pooled over its calls."""
    per_method: dict[str, list[dict]] = {}
    for output, reference, method in zip(actual, expected, methods):
        if output is not None and reference is not None:
            per_method.setdefault(method, []).append(compare_outputs(output, reference, method in logit_methods))
    return {method: merge(numbers) for method, numbers in per_method.items()}


def method_quality(per_sample: list[dict[str, dict]]) -> dict[str, dict]:
    """Per method, `sample_quality` over every sample: pooled numbers with their intervals over samples."""
    methods = list(dict.fromkeys(method for numbers in per_sample for method in numbers))
    return {method: summarize([numbers[method] for numbers in per_sample if method in numbers]) for method in methods}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(other)) per row, in nats."""
    log_p, log_q = _log_softmax(reference), _log_softmax(other)
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def merge(per_prompt: list[dict]) -> dict:
    """Means pooled over every position of every prompt, worst case for minima and maxima."""
    weights = [m.get("positions", 1) for m in per_prompt]
    merged = {}
    for name in per_prompt[0]:
        values = [m[name] for m in per_prompt]
        merged[name] = sum(values) if name == "positions" else min(values) if name.endswith("_min") else \
            max(values) if name.startswith("max") else float(np.average(values, weights=weights))
    return merged


INTERVAL_LEVEL = 0.95
_INTERVAL_NAMES = ("top1", "kl_mean", "cosine_mean")


def intervals(per_prompt: list[dict], resamples: int = 2000) -> dict:
    """A 95% percentile-bootstrap interval over prompts for each pooled mean, e.g. "top1_interval": [lo, hi].

    Seeded, so the same numbers give the same interval on every machine."""
    rng = np.random.default_rng(0)
    weights = np.array([m.get("positions", 1) for m in per_prompt], dtype=np.float64)
    picks = rng.integers(0, len(per_prompt), size=(resamples, len(per_prompt)))
    tail = (1 - INTERVAL_LEVEL) / 2
    found = {}
    for name in (name for name in _INTERVAL_NAMES if name in per_prompt[0]):
        values = np.array([m[name] for m in per_prompt], dtype=np.float64)
        means = (values[picks] * weights[picks]).sum(1) / weights[picks].sum(1)
        found[f"{name}_interval"] = [float(bound) for bound in np.quantile(means, [tail, 1 - tail])]
    return found


def summarize(per_prompt: list[dict]) -> dict:
    """Pooled numbers with their intervals, and how many prompts they rest on."""
    return {**merge(per_prompt), **intervals(per_prompt), "prompts": len(per_prompt)}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, or None when equal."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def similarities(vectors: list[np.ndarray]) -> np.ndarray:
    """Cosine similarity of every vector with every other ([n, n]; -inf on the diagonal, so a row's argmax is its
    nearest neighbour among the others)."""
    stacked = np.stack([np.asarray(v, dtype=np.float64).reshape(-1) for v in vectors])
    stacked /= np.linalg.norm(stacked, axis=1, keepdims=True).clip(min=1e-12)
    similarity = stacked @ stacked.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity


def neighbour_rows(pte: list[np.ndarray], program: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    """Each vector's nearest neighbour among the others by the .pte's outputs, against the float model's; where they
    differ, how much lower the program (its own outputs) ranks the .pte's neighbour than its own choice."""
    by_pte, by_program, by_reference = similarities(pte), similarities(program), similarities(reference)
    rows = []
    for index in range(len(pte)):
        chosen, expected = int(by_pte[index].argmax()), int(by_reference[index].argmax())
        margin = None if chosen == expected else float(by_program[index].max() - by_program[index, chosen])
        rows.append({"pte": chosen, "reference": expected, "program": int(by_program[index].argmax()),
                     "program_margin": margin})
    agreement = sum(row["pte"] == row["reference"] for row in rows) / max(len(rows), 1)
    return {"agreement": agreement, "samples": len(rows), "rows": rows}
