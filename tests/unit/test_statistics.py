"""Pooled agreement with its bootstrap interval, and gates that say which tolerance would accept a failure."""

from __future__ import annotations

from xportbuild.gates import accepting_tolerances, missed
from xportbuild.quality import merge, summarize


def _prompt(positions: int, top1: float, kl: float) -> dict:
    return {"positions": positions, "top1": top1, "kl_mean": kl, "cosine_mean": 0.99, "cosine_min": 0.9,
            "max_abs": 1.0}


def test_means_are_pooled_over_positions_and_extremes_are_the_worst():
    merged = merge([_prompt(10, 1.0, 0.0), _prompt(30, 0.5, 0.2)])
    assert merged["positions"] == 40
    assert merged["top1"] == (10 * 1.0 + 30 * 0.5) / 40 and abs(merged["kl_mean"] - 0.15) < 1e-12


def test_interval_brackets_the_pooled_mean_narrows_with_prompts_and_is_the_same_everywhere():
    few = [_prompt(40, 0.80 + 0.05 * (i % 3), 0.02) for i in range(4)]
    many = few * 8
    low, high = summarize(few)["top1_interval"]
    assert low < summarize(few)["top1"] < high
    many_low, many_high = summarize(many)["top1_interval"]
    assert many_high - many_low < high - low
    assert summarize(few)["top1_interval"] == [low, high]  # seeded: equal numbers, equal interval
    alike = summarize([_prompt(40, 0.9, 0.02)] * 5)
    assert alike["top1_interval"] == [0.9, 0.9] and alike["prompts"] == 5


def test_a_missed_gate_names_the_tolerance_value_that_accepts_it():
    checks = [("top-1", 0.8764, ">=", 0.9, "min_top1"), ("kl", 0.0312, "<=", 0.02, "max_kl"),
              ("cosine", 0.999, ">=", 0.99, "min_cosine")]
    failures = missed(checks)
    assert [failure.tolerance for failure in failures] == ["min_top1", "max_kl"]
    accept = accepting_tolerances(failures)
    assert accept == {"min_top1": 0.876, "max_kl": 0.032}
    relaxed = [(name, value, op, accept.get(tolerance, limit), tolerance) for name, value, op, limit, tolerance in checks]
    assert missed(relaxed) == []


def test_numbers_that_are_not_numbers_fail_every_gate_and_no_tolerance_accepts_them():
    """A .pte that computes NaN fails verification with a line saying so (it used to crash the gate's arithmetic)."""
    from xportbuild.gates import accepting_tolerances, missed

    failures = missed([("vs float: max abs error", float("nan"), "<=", 1.0, "max_abs"),
                       ("vs float: mean cosine", float("-inf"), ">=", 0.99, "min_cosine"),
                       ("vs program: max abs error", 0.5, "<=", 1.0, "max_abs_vs_program")])
    assert [f.text for f in failures] == ["vs float: max abs error is nan (the outputs hold NaN or infinite values)",
                                          "vs float: mean cosine is -inf (the outputs hold NaN or infinite values)"]
    assert accepting_tolerances(failures) == {}


def test_nearest_neighbours_are_compared_and_a_departure_is_weighed_by_the_program():
    """Sentence 0's nearest neighbour is 1 by the float vectors; the .pte's vectors move it to 2, and the program
    either agrees with the .pte (margin 0: the departure is the program's) or prefers 1 by a measured margin."""
    import numpy as np

    from xportbuild.quality import neighbour_rows

    reference = [np.array([1.0, 0.0]), np.array([0.9, 0.1]), np.array([0.0, 1.0])]
    pte = [np.array([0.1, 1.0]), np.array([0.9, 0.1]), np.array([0.0, 1.0])]
    same = neighbour_rows(pte, pte, reference)
    assert same["agreement"] == 1 / 3 and same["rows"][0] == {"pte": 2, "reference": 1, "program": 2,
                                                              "program_margin": 0.0}
    differs = neighbour_rows(pte, reference, reference)["rows"][0]
    assert differs["program"] == 1 and differs["program_margin"] > 0.9
    assert neighbour_rows(reference, reference, reference)["agreement"] == 1.0
