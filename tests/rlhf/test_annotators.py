import math
import random
import re

import pytest

from rlhf.annotators import (
    SimulatedAnnotator,
    label_pairs,
    load_callable,
    make_annotator,
    pairs_from_samples,
    preference_probability,
)
from rlhf.embedded import gold_score, sample_review


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def constant_gold(prompt: str, response: str) -> float:
    return 0.0


@pytest.mark.parametrize(
    "margin, temperature, expected",
    [
        (0.0, 1.0, 0.5),
        (1.0, 1.0, 0.7310585786),  # σ(1)
        (1.0, 2.0, 0.6224593312),  # σ(0.5)
        (-1.0, 1.0, 0.2689414214),  # σ(−1) = 1 − σ(1)
        (2.0, 0.0, 1.0),  # noiseless
        (-2.0, 0.0, 0.0),
        (0.0, 0.0, 0.5),  # exact tie: fair coin
        (7.0, 1e-6, 1.0),  # huge margin / τ must not overflow exp
        (-7.0, 1e-6, 0.0),
    ],
)
def test_preference_probability(margin, temperature, expected):
    assert preference_probability(margin, temperature) == pytest.approx(expected)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("margin", [0.5, 1.0, 2.0])
def test_bradley_terry_frequency_matches_sigmoid(margin, temperature):
    # Gold prefers "a" by `margin`; over 4000 labels the binomial std is ≤ 0.008, so ±0.03 is ~4σ.
    gold = {"a": margin, "b": 0.0}
    annotator = SimulatedAnnotator(lambda p, r: gold[r], temperature=temperature, seed=0)
    frequency = sum(annotator.prefer_first("", "a", "b") for _ in range(4000)) / 4000
    assert frequency == pytest.approx(sigmoid(margin / temperature), abs=0.03)


def test_noiseless_annotator_agrees_fully_and_ties_count_half():
    rows = [{"prompt_id": 0, "prompt": "the plot was", "responses": [" lovely .", " good .", " dull .", " awful ."]}]
    annotator = SimulatedAnnotator(gold_score, temperature=0.0, seed=0)
    preferences, stats = label_pairs(rows, annotator, "sim")
    assert stats == {"n_pairs": 6, "n_skipped_identical": 0, "agreement_with_gold": 1.0}
    assert all(p["gold_margin"] > 0 for p in preferences)
    # Every pair is a tie under a constant gold: labels are coin flips, each counting 0.5.
    tied = SimulatedAnnotator(constant_gold, temperature=0.0, seed=0)
    assert label_pairs(rows, tied, "sim")[1]["agreement_with_gold"] == 0.5
    assert annotator.noiseless_preference("the plot was", " lovely .", " dull .") == 1.0
    assert annotator.noiseless_preference("the plot was", " dull .", " lovely .") == 0.0
    assert annotator.noiseless_preference("the plot was", " dull .", " slow .") == 0.5


def test_flip_prob_adds_uniform_label_noise():
    never_right = SimulatedAnnotator(gold_score, temperature=0.0, flip_prob=1.0, seed=0)
    assert not any(never_right.prefer_first_by_margin(1.0) for _ in range(100))
    noisy = SimulatedAnnotator(gold_score, temperature=0.0, flip_prob=0.2, seed=0)
    assert sum(noisy.prefer_first_by_margin(1.0) for _ in range(4000)) / 4000 == pytest.approx(0.8, abs=0.03)


def test_annotator_is_deterministic_for_a_seed():
    annotators = [SimulatedAnnotator(gold_score, seed=seed) for seed in (5, 5, 6)]
    labels = [[annotator.prefer_first_by_margin(0.3) for _ in range(200)] for annotator in annotators]
    assert labels[0] == labels[1] != labels[2]


@pytest.mark.parametrize("temperature, flip_prob", [(-1.0, 0.0), (1.0, -0.1), (1.0, 1.5)])
def test_invalid_noise_settings(temperature, flip_prob):
    with pytest.raises(ValueError):
        SimulatedAnnotator(gold_score, temperature=temperature, flip_prob=flip_prob, seed=0)


def test_pairs_from_samples():
    assert len(pairs_from_samples("p", ["a", "b", "c", "d"])) == 6  # 4·3/2
    assert pairs_from_samples("p", ["x", "x", "y"]) == [("x", "y")]
    assert pairs_from_samples("p", ["x", "x"]) == []


def _sampled_rows(n_prompts: int, k: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt_id": i, "prompt": "", "responses": [sample_review(rng) for _ in range(k)]} for i in range(n_prompts)
    ]


def test_label_pairs_rows_stats_and_determinism():
    rows = _sampled_rows(n_prompts=30, k=4, seed=0)
    rows.append({"prompt_id": 30, "prompt": "the plot was", "responses": [" dull .", " dull .", " good .", " good ."]})
    preferences, stats = label_pairs(rows, SimulatedAnnotator(gold_score, seed=1), "sim-tau1")
    # Last row: 4·3/2 = 6 index pairs, only (" dull .", " good .") is distinct → 5 skipped.
    assert stats["n_skipped_identical"] >= 5 and stats["n_pairs"] == 30 * 6 + 6 - stats["n_skipped_identical"]
    assert len(preferences) == stats["n_pairs"]
    for row in preferences:
        assert set(row) == {"prompt_id", "prompt", "chosen", "rejected", "annotator", "gold_margin"}
        assert row["annotator"] == "sim-tau1" and row["chosen"] != row["rejected"]
        expected_margin = gold_score(row["prompt"], row["chosen"]) - gold_score(row["prompt"], row["rejected"])
        assert row["gold_margin"] == pytest.approx(expected_margin)
    assert label_pairs(rows, SimulatedAnnotator(gold_score, seed=1), "sim-tau1") == (preferences, stats)
    assert label_pairs(rows, SimulatedAnnotator(gold_score, seed=2), "sim-tau1")[0] != preferences
    assert label_pairs([], SimulatedAnnotator(gold_score, seed=1), "x")[1]["agreement_with_gold"] is None


def test_tau1_agreement_on_sampled_reviews():
    # Calibration check: pairs of independently sampled valid reviews, τ = 1, measured ≈ 0.75.
    _, stats = label_pairs(_sampled_rows(n_prompts=1000, k=2, seed=3), SimulatedAnnotator(gold_score, seed=0), "sim")
    assert 0.70 < stats["agreement_with_gold"] < 0.80


def test_load_callable():
    assert load_callable("rlhf.embedded:gold_score") is gold_score
    assert load_callable("rlhf.annotators:SimulatedAnnotator.prefer_first") is SimulatedAnnotator.prefer_first


@pytest.mark.parametrize(
    "spec",
    [
        "rlhf.embedded.gold_score",
        "rlhf.embedded:",
        ":gold_score",
        "no_such_module_xyz:f",
        "rlhf.embedded:nope",
        "rlhf.embedded:NOUNS",
    ],
)
def test_load_callable_errors_name_the_spec(spec):
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        load_callable(spec)


def test_make_annotator():
    annotator = make_annotator("rlhf.embedded:gold_score", temperature=0.5, flip_prob=0.1, seed=3)
    assert annotator == SimulatedAnnotator(gold_score, temperature=0.5, flip_prob=0.1, seed=3)
    # the same draws as an annotator built directly: the RNG is seeded once, from `seed`
    direct = SimulatedAnnotator(gold_score, temperature=0.5, flip_prob=0.1, seed=3)
    draws = [annotator.prefer_first_by_margin(0.2) for _ in range(50)]
    assert draws == [direct.prefer_first_by_margin(0.2) for _ in range(50)]
    with pytest.raises(ValueError, match="no_such_module"):
        make_annotator("no_such_module:gold", temperature=1.0, flip_prob=0.0, seed=0)
