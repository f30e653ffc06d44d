"""Evaluation: the trained policy against the SFT policy on held-out prompts, proxy (RM) and gold side by side."""

from __future__ import annotations

import contextlib
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.distributed import gather_in_order, shard_slice
from rlhf.generation import decode_responses, rank_seed, sample_batches
from rlhf.modeling import RewardNormalization
from rlhf.rollout import response_logprobs, reward_scores


@dataclass
class Samples:
    """Sampled responses of one policy; n = prompts × samples per prompt, in prompt-major order."""

    prompts: list[str]
    responses: list[str]  # decoded, special tokens removed
    finished: list[bool]  # emitted EOS within the length cap
    lengths: list[int]  # response tokens including the EOS
    rm_scores: list[float]  # normalised reward-model score
    kl_to_reference: list[float]  # Σ_t log π(y_t) − log π_ref(y_t) for this sample (sequence k1 estimate)


@torch.no_grad()
def sample_and_score(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    reward_model: PreTrainedModel,
    normalization: RewardNormalization,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 256,
    accelerator: Accelerator | None = None,
    sampling_seeds: str = "per_rank",
) -> Samples:
    """Sample ``samples_per_prompt`` responses per prompt and score them with the RM and the reference.

    With an ``accelerator`` of N processes each samples and scores its shard of the prompts (rlhf/generation.py) and
    every process gets all the samples back in prompt order; ``sampling_seeds`` as in :mod:`rlhf.generation`.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    torch.manual_seed(rank_seed(seed, rank))
    mine = shard_slice(len(prompts), rank, world)
    k, per_prompt = samples_per_prompt, []
    batches = sample_batches(
        policy,
        tokenizer,
        [prompts[i] for i in mine],
        list(mine),
        k,
        max_new_tokens,
        temperature,
        max(1, batch_size // k),  # evaluate.batch_size counts sampled rows (prompts × samples), whole prompts
        episode_seed=seed if sampling_seeds == "per_episode" else None,
    )
    with accelerator.autocast() if accelerator else contextlib.nullcontext():
        for batch in batches:
            args = (batch.query_ids, batch.query_mask, batch.responses, batch.response_mask)
            kl = (response_logprobs(policy, *args, temperature) - response_logprobs(reference, *args, temperature)) * (
                batch.response_mask
            )
            columns = (
                [prompt for prompt in batch.prompts for _ in range(k)],
                decode_responses(tokenizer, batch),
                batch.finished.tolist(),
                batch.response_mask.sum(1).tolist(),
                reward_scores(reward_model, normalization, *args).float().tolist(),
                kl.sum(1).float().tolist(),
            )
            rows = list(zip(*columns))  # one tuple per sample, in the Samples field order
            per_prompt += [rows[i * k : (i + 1) * k] for i in range(len(batch.prompts))]
    if accelerator is not None:
        per_prompt = gather_in_order(per_prompt, accelerator)
    samples = [row for rows in per_prompt for row in rows]
    return Samples(*(list(column) for column in zip(*samples))) if samples else Samples([], [], [], [], [], [])


T = TypeVar("T")


def pair_outcomes(scores_a: list[float], scores_b: list[float]) -> list[float]:
    """Per paired comparison: 1 if a wins, 0.5 for a tie, 0 if b wins."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b)]


def win_rate(scores_a: list[float], scores_b: list[float]) -> float:
    """Share of paired comparisons a wins, ties counting half."""
    outcomes = pair_outcomes(scores_a, scores_b)
    return sum(outcomes) / len(outcomes)


def bootstrap_interval(
    values: Sequence[T],
    statistic: Callable[[list[T]], float],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(values)`` (Efron & Tibshirani 1993, ch. 13).

    Draws ``n_resamples`` samples of len(values) with replacement (numpy PCG64 seeded with ``seed``, so the
    interval is a deterministic function of its arguments) and returns the (1 − confidence)/2 and
    (1 + confidence)/2 quantiles of the resampled statistic.
    """
    if not values:
        raise ValueError("bootstrap_interval needs a non-empty sample")
    if not 0 < confidence < 1 or n_resamples < 1:
        raise ValueError("bootstrap_interval needs 0 < confidence < 1 and n_resamples ≥ 1")
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(values), size=(n_resamples, len(values)))
    resampled = np.array([statistic([values[i] for i in row]) for row in indices], dtype=float)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return float(low), float(high)


def win_rate_interval(
    scores_a: list[float],
    scores_b: list[float],
    groups: list[Any] | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap interval of :func:`win_rate` over the per-pair outcomes (1 / 0.5 / 0).

    ``groups`` (e.g. the prompt of each pair) resamples whole groups instead of single pairs: samples of one prompt
    are correlated, and treating them as independent would make the interval too narrow.
    """
    outcomes = pair_outcomes(scores_a, scores_b)
    keys = groups if groups is not None else list(range(len(outcomes)))
    clusters: dict[Any, list[float]] = {}
    for key, outcome in zip(keys, outcomes):
        clusters.setdefault(key, []).append(outcome)

    def pooled_win_rate(sample: list[list[float]]) -> float:
        return sum(map(sum, sample)) / sum(map(len, sample))

    return bootstrap_interval(list(clusters.values()), pooled_win_rate, n_resamples, confidence, seed)


def distinct_fraction(texts: list[str]) -> float:
    """Unique responses / responses (mode narrowing shows up here)."""
    return len(set(texts)) / max(1, len(texts))


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """Whitespace-token n-grams of one text."""
    words = text.split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """distinct-n (Li et al. 2016): unique word n-grams / all word n-grams, pooled over ``texts`` (0 if none)."""
    ngrams = [gram for text in texts for gram in word_ngrams(text, n)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def repetition_rate(texts: list[str], n: int = 2) -> float:
    """Share of texts in which some word n-gram occurs more than once (degenerate loops: "was lovely was lovely")."""
    repeated = [any(count > 1 for count in Counter(word_ngrams(text, n)).values()) for text in texts]
    return sum(repeated) / max(1, len(texts))


def compare_policies(
    policy: Samples,
    sft: Samples,
    gold: Callable[[str, str], float] | None,
    is_valid: Callable[[str, str], bool] | None,
    seed: int = 0,
    n_resamples: int = 1000,
) -> dict[str, float]:
    """Metrics of ``policy`` vs ``sft`` (paired sample by sample, same prompts in the same order).

    Win rates come with a 95 % percentile-bootstrap interval (``*_ci_low``/``*_ci_high``) that resamples prompts.
    """
    mean = statistics.fmean
    metrics: dict[str, float] = {
        "n_prompts": len(set(policy.prompts)),
        "n_samples": len(policy.prompts),
        "rm_score_policy": mean(policy.rm_scores),
        "rm_score_sft": mean(sft.rm_scores),
        "rm_win_rate": win_rate(policy.rm_scores, sft.rm_scores),
        "kl_to_ref": mean(policy.kl_to_reference),
        "eos_rate_policy": mean(map(float, policy.finished)),
        "eos_rate_sft": mean(map(float, sft.finished)),
        "response_length_policy": mean(policy.lengths),
        "response_length_sft": mean(sft.lengths),
        "distinct_policy": distinct_fraction(policy.responses),
        "distinct_sft": distinct_fraction(sft.responses),
        "distinct_1_policy": distinct_n(policy.responses, 1),
        "distinct_1_sft": distinct_n(sft.responses, 1),
        "distinct_2_policy": distinct_n(policy.responses, 2),
        "distinct_2_sft": distinct_n(sft.responses, 2),
        "repetition_rate_policy": repetition_rate(policy.responses),
        "repetition_rate_sft": repetition_rate(sft.responses),
    }
    interval = dict(groups=policy.prompts, n_resamples=n_resamples, seed=seed)
    metrics["rm_win_rate_ci_low"], metrics["rm_win_rate_ci_high"] = win_rate_interval(
        policy.rm_scores, sft.rm_scores, **interval
    )

    def valid(samples: Samples) -> list[bool]:
        checks = zip(samples.prompts, samples.responses, samples.finished)
        return [done and (is_valid is None or is_valid(p, r)) for p, r, done in checks]

    metrics["valid_rate_policy"] = mean(map(float, valid(policy)))
    metrics["valid_rate_sft"] = mean(map(float, valid(sft)))
    if gold is not None:
        gold_policy = [gold(p, r) for p, r in zip(policy.prompts, policy.responses)]
        gold_sft = [gold(p, r) for p, r in zip(sft.prompts, sft.responses)]
        sft_std = statistics.pstdev(gold_sft)
        metrics.update(
            {
                "gold_win_rate": win_rate(gold_policy, gold_sft),
                **dict(
                    zip(
                        ("gold_win_rate_ci_low", "gold_win_rate_ci_high"),
                        win_rate_interval(gold_policy, gold_sft, **interval),
                    )
                ),
                "gold_score_policy": mean(gold_policy),
                "gold_score_sft": mean(gold_sft),
                "gold_score_sft_std": sft_std,
                "gold_gain_in_sft_std": (mean(gold_policy) - mean(gold_sft)) / sft_std if sft_std > 0 else 0.0,
            }
        )
    return metrics


def samples_table(policy: Samples, sft: Samples, gold: Callable[[str, str], float] | None, n_rows: int) -> str:
    """Markdown table of the first ``n_rows`` paired samples with their scores."""
    header = "| prompt | SFT | PPO | RM SFT | RM PPO | gold SFT | gold PPO |\n|---|---|---|---|---|---|---|\n"

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ").strip() or "∅"

    rows = []
    for i in range(min(n_rows, len(policy.prompts))):
        p = policy.prompts[i]
        gold_sft = f"{gold(p, sft.responses[i]):.2f}" if gold else "–"
        gold_ppo = f"{gold(p, policy.responses[i]):.2f}" if gold else "–"
        rows.append(
            f"| {cell(p)} | {cell(sft.responses[i])} | {cell(policy.responses[i])} | "
            f"{sft.rm_scores[i]:.2f} | {policy.rm_scores[i]:.2f} | {gold_sft} | {gold_ppo} |"
        )
    return header + "\n".join(rows) + "\n"


def checkpoint_summary(
    samples: Samples, gold: Callable[[str, str], float] | None, is_valid: Callable[[str, str], bool] | None
) -> dict[str, float | str]:
    """One point of the over-optimisation curve: mean RM (proxy) score, gold score, KL to the reference, validity."""
    mean = statistics.fmean
    checks = zip(samples.prompts, samples.responses, samples.finished)
    return {
        "rm_score": mean(samples.rm_scores),
        "gold_score": mean(gold(p, r) for p, r in zip(samples.prompts, samples.responses)) if gold else "",
        "kl": mean(samples.kl_to_reference),
        "valid_rate": mean(float(done and (is_valid is None or is_valid(p, r))) for p, r, done in checks),
    }
