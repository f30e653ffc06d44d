"""Evaluation arithmetic on hand-checkable numbers."""

from __future__ import annotations

import pytest

from rlhf.evaluation import Samples, compare_policies, distinct_fraction, win_rate


def test_win_rate_counts_ties_half() -> None:
    # wins: 3>1, tie 2=2, loss 0<5, win 4>3 → (1 + 0.5 + 0 + 1) / 4 = 0.625
    assert win_rate([3, 2, 0, 4], [1, 2, 5, 3]) == 0.625
    with pytest.raises(ValueError):
        win_rate([1.0], [])


def test_distinct_fraction() -> None:
    assert distinct_fraction(["a", "b", "a", "a"]) == 0.5


def samples(responses: list[str], finished: list[bool], rm: list[float], kl: list[float]) -> Samples:
    return Samples(["p"] * len(responses), responses, finished, [len(r) for r in responses], rm, kl)


def test_compare_policies_on_hand_values() -> None:
    gold = {"good": 2.0, "ok": 1.0, "bad": -1.0, "junk": -4.0}
    policy = samples(["good", "good", "ok", "junk"], [True, True, True, False], [1.0, 1.0, 0.5, -1.0], [1.0, 2.0, 3.0, 2.0])
    sft = samples(["bad", "good", "junk", "ok"], [True, True, True, True], [-1.0, 1.0, -2.0, 0.5], [0.0] * 4)
    metrics = compare_policies(policy, sft, lambda p, r: gold[r], lambda p, r: r != "junk")
    # gold pairs: 2>−1 win, 2=2 tie, 1>−4 win, −4<1 loss → (1 + 0.5 + 1 + 0) / 4
    assert metrics["gold_win_rate"] == 0.625
    assert metrics["gold_score_policy"] == pytest.approx((2 + 2 + 1 - 4) / 4)
    assert metrics["gold_score_sft"] == pytest.approx((-1 + 2 - 4 + 1) / 4)
    # valid = finished and the validity judge agrees: policy 3/4 (junk unfinished), SFT 3/4 (junk)
    assert metrics["valid_rate_policy"] == 0.75 and metrics["valid_rate_sft"] == 0.75
    assert metrics["kl_to_ref"] == 2.0 and metrics["eos_rate_policy"] == 0.75
    assert metrics["distinct_policy"] == 0.75 and metrics["rm_win_rate"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
