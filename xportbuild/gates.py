"""Tolerances applied to verification numbers: which checks fail, and the tolerance values that would accept them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from xportbuild.recipe.spec import Tolerances


@dataclass(frozen=True)
class Missed:
    """A threshold the numbers miss: the readable line, and the tolerance value that would have accepted them
    (`tolerance` is "" where no tolerance can accept it)."""

    text: str
    tolerance: str
    op: str
    accepting: float


Check = tuple[str, float, str, float, str]  # (what, value, ">=" or "<=", limit, the tolerance that sets the limit)


def missed(checks: list[Check]) -> list[Missed]:
    """The checks that fail. A value that is not a number fails whatever its limit, and no tolerance accepts it."""
    return [Missed(f"{name} {value:.6g} (required {op} {limit:g})", tolerance, op, accepting(value, op))
            if math.isfinite(value) else
            Missed(f"{name} is {value} (the outputs hold NaN or infinite values)", "", op, 0.0)
            for name, value, op, limit, tolerance in checks
            if not math.isfinite(value) or not (value >= limit if op == ">=" else value <= limit)]


def accepting(value: float, op: str) -> float:
    """The measured value rounded outwards to 3 decimals: a limit that accepts it."""
    return math.floor(value * 1000) / 1000 if op == ">=" else math.ceil(value * 1000) / 1000


def accepting_tolerances(failures: list[Missed]) -> dict[str, float]:
    """Per tolerance, the value that accepts every failure it caused."""
    accept: dict[str, float] = {}
    for failure in (failure for failure in failures if failure.tolerance):
        lenient = min if failure.op == ">=" else max
        accept[failure.tolerance] = lenient(accept.get(failure.tolerance, failure.accepting), failure.accepting)
    return accept


def threshold_checks(ref: dict, prog: dict, tolerances: Tolerances) -> list[Check]:
    """The recipe's thresholds on numbers against float (`ref`) and against the program (`prog`); top-1 and KL only
    where the outputs are scores (logits), not hidden states.

    Where top-1 has a bootstrap interval, the gate is its upper end: top-1 over a few hundred positions moves by
    whole points when near-ties flip between machines, so it fails only when the data exclude `min_top1`."""
    checks: list[Check] = [("vs float: mean cosine", ref["cosine_mean"], ">=", tolerances.min_cosine, "min_cosine")]
    if "top1_interval" in ref:
        checks.append(("vs float: top-1 agreement, upper end of its 95% interval", ref["top1_interval"][1], ">=",
                       tolerances.min_top1, "min_top1"))
    elif "top1" in ref:
        checks.append(("vs float: top-1 agreement", ref["top1"], ">=", tolerances.min_top1, "min_top1"))
    checks.append(("vs float: max abs error", ref["max_abs"], "<=", tolerances.max_abs, "max_abs"))
    if "kl_mean" in ref:
        checks.append(("vs float: mean KL divergence", ref["kl_mean"], "<=", tolerances.max_kl, "max_kl"))
    checks += [("vs program: min cosine", prog["cosine_min"], ">=", tolerances.min_cosine_vs_program,
                "min_cosine_vs_program"),
               ("vs program: max abs error", prog["max_abs"], "<=", tolerances.max_abs_vs_program, "max_abs_vs_program")]
    if "kl_mean" in prog:
        checks.append(("vs program: mean KL divergence", prog["kl_mean"], "<=", tolerances.max_kl_vs_program,
                       "max_kl_vs_program"))
    return checks
