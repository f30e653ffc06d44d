"""Evaluation arithmetic on hand-checkable numbers."""

from __future__ import annotations

import statistics

import pytest

from rlhf.evaluation import (
    Samples,
    bootstrap_interval,
    compare_policies,
    distinct_fraction,
    distinct_n,
    pair_outcomes,
    repetition_rate,
    win_rate,
    win_rate_interval,
)


def test_win_rate_counts_ties_half() -> None:
    # wins: 3>1, tie 2=2, loss 0<5, win 4>3 → (1 + 0.5 + 0 + 1) / 4 = 0.625
    assert win_rate([3, 2, 0, 4], [1, 2, 5, 3]) == 0.625
    with pytest.raises(ValueError):
        win_rate([1.0], [])


def test_pair_outcomes_score_a_win_one_a_tie_half() -> None:
    assert pair_outcomes([3, 2, 0], [1, 2, 5]) == [1.0, 0.5, 0.0]


def test_bootstrap_of_a_constant_sample_has_zero_width() -> None:
    # every resample of [3, 3, …] has mean 3
    assert bootstrap_interval([3.0] * 10, statistics.fmean, seed=0) == (3.0, 3.0)


def test_bootstrap_of_fifty_fifty_brackets_one_half_at_the_normal_width() -> None:
    # mean 0.5, standard error sqrt(0.25 / 100) = 0.05 → normal 95 % interval 0.5 ± 0.098 ≈ [0.40, 0.60]
    values = [0.0, 1.0] * 50
    low, high = bootstrap_interval(values, statistics.fmean, n_resamples=1000, seed=0)
    assert 0.37 <= low <= 0.43 and 0.57 <= high <= 0.63 and low < 0.5 < high
    assert (low, high) == (0.4, 0.6)  # measured with seed 0; the same seed gives the same interval
    assert bootstrap_interval(values, statistics.fmean, seed=0) == (low, high)
    narrow = bootstrap_interval(values, statistics.fmean, confidence=0.5, seed=0)
    assert low <= narrow[0] <= narrow[1] <= high  # a 50 % interval sits inside the 95 % one


def test_bootstrap_rejects_an_empty_sample() -> None:
    with pytest.raises(ValueError):
        bootstrap_interval([], statistics.fmean)


def test_win_rate_interval_of_a_clean_sweep_is_one() -> None:
    assert win_rate_interval([2, 3, 4], [1, 1, 1]) == (1.0, 1.0)


def test_win_rate_interval_resamples_whole_prompts() -> None:
    # outcomes 1, 0.5 (prompt a) and 0, 1 (prompt b): resampling 2 prompts gives {a,a} 0.75 (p=1/4), {a,b} 0.625
    # (p=1/2) or {b,b} 0.5 (p=1/4); the 2.5 % and 97.5 % quantiles of 1000 draws are the extremes 0.5 and 0.75
    assert win_rate_interval([3, 2, 0, 4], [1, 2, 5, 3], groups=["a", "a", "b", "b"], seed=0) == (0.5, 0.75)


def test_distinct_fraction() -> None:
    assert distinct_fraction(["a", "b", "a", "a"]) == 0.5


def test_distinct_n_pools_ngrams_over_texts() -> None:
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c → 3 unique / 7
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    # bigrams: ab ba ab | ab bc → {ab, ba, bc} = 3 unique / 5
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(["a"], 2) == 0.0  # no bigrams at all


def test_repetition_rate_counts_texts_with_a_repeated_ngram() -> None:
    texts = ["the plot was lovely .", "lovely was lovely was lovely .", "the cast was dull and the music was fine ."]
    # bigrams repeat only in the loop ("lovely was" ×2, "was lovely" ×2) → 1 / 3
    assert repetition_rate(texts, 2) == pytest.approx(1 / 3)
    # unigrams also repeat in the two-clause review ("the", "was") → 2 / 3
    assert repetition_rate(texts, 1) == pytest.approx(2 / 3)


def samples(responses: list[str], finished: list[bool], rm: list[float], kl: list[float]) -> Samples:
    return Samples(["p"] * len(responses), responses, finished, [len(r) for r in responses], rm, kl)


def test_compare_policies_on_hand_values() -> None:
    gold = {"good": 2.0, "ok": 1.0, "bad": -1.0, "junk": -4.0}
    policy = samples(
        ["good", "good", "ok", "junk"], [True, True, True, False], [1.0, 1.0, 0.5, -1.0], [1.0, 2.0, 3.0, 2.0]
    )
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
    # all four samples share one prompt: resampling the only prompt always gives the observed win rate
    assert metrics["gold_win_rate_ci_low"] == metrics["gold_win_rate_ci_high"] == 0.625
    # words: good good ok junk → 3 unique unigrams / 4; no bigrams in one-word responses
    assert metrics["distinct_1_policy"] == 0.75 and metrics["distinct_2_policy"] == 0.0
    assert metrics["repetition_rate_policy"] == 0.0
