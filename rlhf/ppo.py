"""PPO for RLHF: masked statistics, log-probs, KL penalties, rewards, GAE, losses and the KL controller.

Pure tensor functions, no models and no process group: the PPO stage (``tasks/ppo.py``) calls them in order.
Shapes use ``b`` for the batch of episodes and ``t`` for the response length (response tokens only; the query
is never part of these tensors). A ``response_mask`` is ``(b, t)`` bool, True at real response tokens; every
statistic here ignores the False positions, whatever values they hold (docs/design.md §4.6).

Sources:
- PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
- GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation".
- RLHF details: Huang et al. 2023, "The N Implementation Details of RLHF with PPO" (and the TL;DR follow-up).
- Adaptive KL: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences".
- KL estimators: Schulman 2020, "Approximating KL Divergence" (blog post).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

AllReduceSum = Callable[[Tensor], Tensor] | None
"""Sums a tensor across processes (identity when None), e.g. ``lambda x: accelerator.reduce(x, "sum")``.

Passed to the statistics below so that under accelerate the mean and variance are those of the global batch,
not of each process's shard (Huang et al. 2023: whitening statistics must be global).
"""

KLEstimator = Literal["k1", "k3"]


# --- Masked statistics -------------------------------------------------------------------------------------------


def _stat_dtype(values: Tensor) -> torch.dtype:
    # Accumulate low-precision inputs in float32: bf16 sums and counts lose integers above 256.
    return torch.promote_types(values.dtype, torch.float32)


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is True.

    Args:
        values: any shape, e.g. ``(b, t)``.
        mask: same shape, bool (or 0/1).
        dim: dimension to reduce; None reduces everything to a scalar.

    ``torch.where`` rather than ``values * mask``: padding may hold inf/nan, and ``inf * 0`` is nan.
    """
    kept = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() if dim is None else kept.sum(dim)


def _global_sum_and_count(values: Tensor, mask: Tensor, all_reduce_sum: AllReduceSum) -> tuple[Tensor, Tensor]:
    """Scalar sum and count of the valid entries, summed over processes in ONE collective."""
    dtype = _stat_dtype(values)
    total = torch.stack([masked_sum(values.to(dtype), mask), mask.bool().sum().to(dtype)])
    if all_reduce_sum is not None:
        total = all_reduce_sum(total)
    return total[0], total[1]


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None, all_reduce_sum: AllReduceSum = None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is True (docs/design.md §4.6: no padding in a mean).

    Args:
        values: any shape, e.g. ``(b, t)``.
        mask: same shape as ``values``.
        dim: dimension to reduce (e.g. ``-1`` for a per-sequence mean ``(b,)``); None gives a scalar.
        all_reduce_sum: when given (requires ``dim=None``) both the sum and the count are summed across
            processes, so the result is the mean of the global batch even if shards hold different numbers of
            valid tokens.

    A reduction with no valid entry gives 0 (not nan), so an empty row cannot poison a loss.
    """
    if all_reduce_sum is not None:
        if dim is not None:
            raise ValueError("masked_mean: all_reduce_sum needs dim=None (a global scalar statistic)")
        total, count = _global_sum_and_count(values, mask, all_reduce_sum)
        return total / count.clamp_min(1)
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(values.to(_stat_dtype(values)), mask, dim) / count.clamp_min(1)


def _masked_mean_var(
    values: Tensor, mask: Tensor, unbiased: bool, all_reduce_sum: AllReduceSum
) -> tuple[Tensor, Tensor]:
    """Global (scalar) mean and variance of the valid entries, in two collectives.

    Two passes (mean, then squared deviations) instead of E[x²] − E[x]², which cancels badly in float32.
    """
    total, count = _global_sum_and_count(values, mask, all_reduce_sum)
    mean = total / count.clamp_min(1)
    centred = values.to(mean.dtype) - mean
    squared_deviations = masked_sum(centred.square(), mask)
    if all_reduce_sum is not None:
        squared_deviations = all_reduce_sum(squared_deviations)
    # Bessel's correction; a single valid entry gives variance 0 rather than a division by zero.
    denominator = (count - 1).clamp_min(1) if unbiased else count.clamp_min(1)
    return mean, squared_deviations / denominator


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True, all_reduce_sum: AllReduceSum = None) -> Tensor:
    """Scalar variance of ``values`` over the valid positions, global across processes when ``all_reduce_sum``.

    Args:
        values: any shape, e.g. ``(b, t)``.
        mask: same shape.
        unbiased: divide by ``n − 1`` (Bessel) instead of ``n``.
    """
    return _masked_mean_var(values, mask, unbiased, all_reduce_sum)[1]


def masked_whiten(
    values: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    all_reduce_sum: AllReduceSum = None,
    eps: float = 1e-8,
) -> Tensor:
    """Normalise the valid entries to mean 0 and (unbiased) std 1; masked positions are returned as 0.

    Used for advantages (and optionally rewards) in PPO for RLHF (Huang et al. 2023, "advantage whitening").
    Statistics are global across processes when ``all_reduce_sum`` is given (docs/design.md §4.3).

    Args:
        values: ``(b, t)``, e.g. advantages.
        mask: ``(b, t)`` response mask.
        shift_mean: if False, the mean is added back so only the scale changes (the convention used for
            whitening rewards, whose sign carries meaning).
        eps: added to the variance before the square root.

    Returns:
        ``(b, t)``, same dtype as ``values``.
    """
    mean, var = _masked_mean_var(values, mask, unbiased=True, all_reduce_sum=all_reduce_sum)
    whitened = (values.to(mean.dtype) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened)).to(values.dtype)


# --- Log-probabilities and entropy -------------------------------------------------------------------------------


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each sampled token under the (temperature-scaled) policy.

    Args:
        logits: ``(b, t, vocab)``, the logits that predict ``tokens`` (already shifted by one).
        tokens: ``(b, t)`` int token ids.
        temperature: the sampling temperature. The logits are divided by it first, so the log-probs are those
            of the distribution the tokens were actually sampled from (Huang et al. 2023, detail "dividing
            the logits by the sampling temperature"); otherwise the PPO ratio is off even before any update.

    Returns:
        ``(b, t)`` log-probs. ``log_softmax`` + ``gather``: never materialises the probabilities, and keeps
        only one extra ``(b, t, vocab)`` tensor alive.
    """
    _check_temperature(temperature)
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    return log_probs.gather(-1, tokens.unsqueeze(-1).long()).squeeze(-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy ``−Σ p log p`` of the temperature-scaled next-token distribution.

    Args:
        logits: ``(b, t, vocab)``.
        temperature: sampling temperature, as in :func:`logprobs_from_logits`.

    Returns:
        ``(b, t)`` entropies in nats.
    """
    _check_temperature(temperature)
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    # Clamp −inf (banned tokens) to a finite floor: then p·log p = 0·finite = 0, in the value and the gradient.
    log_probs = log_probs.clamp_min(torch.finfo(log_probs.dtype).min)
    return -(log_probs.exp() * log_probs).sum(-1)


# --- Stop tokens and positions -----------------------------------------------------------------------------------


def first_true_index(bools: Tensor, dim: int = -1) -> Tensor:
    """Index of the first True along ``dim``, or ``bools.size(dim)`` where there is none.

    Args:
        bools: any shape, e.g. ``(b, t)``.

    Returns:
        ``bools`` with ``dim`` removed, e.g. ``(b,)``, int64.
    """
    dim = dim % bools.ndim
    size = bools.size(dim)
    positions = torch.arange(size, device=bools.device).view([size] + [1] * (bools.ndim - dim - 1))
    return torch.where(bools.bool(), positions, size).min(dim).values


def truncate_after_stop_token(
    responses: Tensor, stop_token_id: int, pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The "EOS trick" (Huang et al. 2023; docs/design.md §4.5): cut each response at its first stop token.

    Sampling runs for a fixed number of tokens; whatever follows the first stop token is not part of the
    episode, so it is replaced by padding and masked out of every later computation.

    Args:
        responses: ``(b, t)`` sampled token ids.
        stop_token_id: e.g. the EOS id.
        pad_token_id: written after the stop token.

    Returns:
        ``truncated`` ``(b, t)``: tokens after the first stop token set to ``pad_token_id``;
        ``response_mask`` ``(b, t)`` bool: True up to and including the stop token (all True if none);
        ``contains_stop`` ``(b,)`` bool: whether the row has a stop token (rows without one get the fixed
        missing-EOS penalty score in the PPO stage).
    """
    is_stop = responses == stop_token_id
    stop_index = first_true_index(is_stop, dim=-1)
    positions = torch.arange(responses.size(-1), device=responses.device)
    response_mask = positions.unsqueeze(0) <= stop_index.unsqueeze(-1)
    truncated = torch.where(response_mask, responses, torch.full_like(responses, pad_token_id))
    return truncated, response_mask, is_stop.any(-1)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last True position per row: the last real token (the EOS itself, not the pad after it).

    Args:
        mask: ``(b, t)``.

    Returns:
        ``(b,)`` int64; −1 for a row with no True.
    """
    t = mask.size(-1)
    # First True of the reversed row, mapped back; no True gives t − 1 − t = −1.
    return t - 1 - first_true_index(mask.bool().flip(-1), dim=-1)


# --- KL penalty and rewards --------------------------------------------------------------------------------------


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator) -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from the log-probs of tokens sampled from π (Schulman's blog).

    Args:
        logprobs: ``(b, t)`` log π(token).
        ref_logprobs: ``(b, t)`` log π_ref(token).
        estimator: ``"k1"``: ``log π − log π_ref``, unbiased but a single token can be negative;
            ``"k3"``: ``(r − 1) − log r`` with ``r = π_ref/π``, unbiased and always ≥ 0, lower variance.

    Returns:
        ``(b, t)``.
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        return torch.expm1(log_ratio) - log_ratio  # expm1: exact near r = 1, where the two terms cancel
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token rewards: a KL penalty at every response token plus the RM score on the last real token.

    Ziegler et al. 2019 / Huang et al. 2023: ``R_t = −β·KL_t``, and the sequence-level score is added at the
    last real token (the EOS position, not the pad after it; docs/design.md §4.4).

    Args:
        scores: ``(b,)`` reward-model scores (after any missing-EOS penalty).
        logprobs: ``(b, t)`` policy log-probs of the sampled tokens.
        ref_logprobs: ``(b, t)`` reference-model log-probs of the same tokens.
        response_mask: ``(b, t)`` True at real response tokens.
        kl_coef: β.
        estimator: see :func:`kl_per_token`.

    Returns:
        ``rewards`` ``(b, t)``, ``kl`` ``(b, t)`` and ``non_score_reward = −β·kl`` ``(b, t)``; all 0 where masked.
        A row with no valid token receives no score.
    """
    mask = response_mask.bool()
    kl = kl_per_token(logprobs, ref_logprobs, estimator)
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    non_score_reward = -kl_coef * kl
    last = last_token_index(mask)
    has_token = last >= 0
    score_column = torch.where(has_token, scores.to(non_score_reward.dtype), 0.0).unsqueeze(-1)
    rewards = non_score_reward.scatter_add(-1, last.clamp_min(0).unsqueeze(-1), score_column)
    return rewards, kl, non_score_reward


# --- Advantages --------------------------------------------------------------------------------------------------


@torch.no_grad()
def gae_advantages(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens (Schulman et al. 2016).

    ``δ_t = r_t + γ·V_{t+1} − V_t``; ``A_t = δ_t + γλ·A_{t+1}``, where "t + 1" is the next *valid* token and
    the value after the last real token is 0 (the episode ends there). Masked positions are skipped: their
    rewards and values never enter, and they get 0. No gradient flows: these are regression/policy targets.

    Args:
        rewards: ``(b, t)`` per-token rewards (:func:`compute_rewards`).
        values: ``(b, t)`` value estimates at the response tokens, from the rollout.
        response_mask: ``(b, t)``.
        gamma: discount; 1 is the RLHF default (Huang et al. 2023).
        lam: GAE λ.

    Returns:
        ``advantages`` ``(b, t)`` and ``returns = advantages + values`` ``(b, t)`` (the value targets);
        0 where masked.
    """
    mask = response_mask.bool()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    # Backward over time (t is short), vectorised over the batch; carries pass unchanged through padding.
    for step in reversed(range(rewards.size(-1))):
        valid = mask[:, step]
        delta = rewards[:, step] + gamma * next_value - values[:, step]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, step] = torch.where(valid, advantage, 0.0)
        next_value = torch.where(valid, values[:, step], next_value)
        next_advantage = torch.where(valid, advantage, next_advantage)
    returns = torch.where(mask, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


# --- Losses ------------------------------------------------------------------------------------------------------


def clipped_surrogate_objective(
    ratio: Tensor, advantages: Tensor, clip_range: float, clip_range_high: float | None = None, dual_clip: float = 0.0
) -> Tensor:
    """Elementwise PPO clipped objective ``min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A)`` (Schulman et al. 2017, eq. 7).

    The pessimistic minimum removes any incentive to move the ratio beyond the clip range in the direction that
    helps. This is the objective (to maximise), not a loss. Any shape; e.g. ``(b, t)``.

    Args:
        clip_range: ε_low (and ε_high when ``clip_range_high`` is None).
        clip_range_high: ε_high, the upper clip alone ("clip-higher", DAPO: Yu et al. 2025, arXiv:2503.14476;
            ε_high = 0.28 leaves low-probability tokens room to grow, against entropy collapse).
        dual_clip: c > 1 bounds the objective of a negative advantage from below at ``c·A`` (dual-clip PPO, Ye et
            al. 2020, "Mastering Complex Control in MOBA Games"): with A < 0 and r ≫ 1 the loss ``−r·A`` would be
            unbounded; 0 = off.
    """
    high = clip_range if clip_range_high is None else clip_range_high
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + high) * advantages
    objective = torch.minimum(unclipped, clipped)
    if dual_clip:
        objective = torch.where(advantages < 0, torch.maximum(objective, dual_clip * advantages), objective)
    return objective


LossAggregation = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def aggregate_loss(values: Tensor, mask: Tensor, mode: LossAggregation = "token-mean", horizon: int = 1) -> Tensor:
    """A scalar loss from per-token terms (verl's ``loss_agg_mode``; docs/design.md §4b).

    Args:
        values: ``(b, t)`` per-token loss terms.
        mask: ``(b, t)``.
        mode: ``"token-mean"``: Σ values / Σ tokens, every token weighs the same (DAPO, VAPO; PPO's default);
            ``"seq-mean-token-mean"``: the mean over sequences of each sequence's token mean (GRPO as published:
            a token of a short response weighs more); ``"seq-mean-token-sum"``: the mean over sequences of each
            sequence's token sum; ``"seq-mean-token-sum-norm"``: the same divided by the constant ``horizon``
            (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783: no per-response length normalisation, so no length bias).
        horizon: the response length cap, for ``seq-mean-token-sum-norm``.

    Sequences without a valid token (e.g. a filtered group) are left out of the sequence means; all-empty gives 0.
    """
    if mode == "token-mean":
        return masked_mean(values, mask)
    sequences = mask.bool().any(-1)
    if mode == "seq-mean-token-mean":
        per_sequence = masked_mean(values, mask, dim=-1)
    elif mode == "seq-mean-token-sum":
        per_sequence = masked_sum(values.to(_stat_dtype(values)), mask, dim=-1)
    elif mode == "seq-mean-token-sum-norm":
        per_sequence = masked_sum(values.to(_stat_dtype(values)), mask, dim=-1) / horizon
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}")
    return masked_mean(per_sequence, sequences)


def loss_units(mask: Tensor, mode: LossAggregation) -> int:
    """What :func:`aggregate_loss` averages over: valid tokens (token-mean) or sequences with a valid token.

    The micro-batch weights of a minibatch are shares of these units, so that the summed gradient is the
    minibatch's own aggregate whatever the micro-batching (rlhf.distributed.token_weight)."""
    mask = mask.bool()
    return int(mask.sum()) if mode == "token-mean" else int(mask.any(-1).sum())


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_range: float,
    clip_range_high: float | None = None,
    dual_clip: float = 0.0,
    aggregation: LossAggregation = "token-mean",
    horizon: int = 1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO policy loss: the negated clipped surrogate, aggregated over valid tokens (:func:`aggregate_loss`).

    Args:
        logprobs: ``(b, t)`` log-probs under the current policy (with gradient).
        old_logprobs: ``(b, t)`` log-probs at rollout time.
        advantages: ``(b, t)``, usually whitened.
        response_mask: ``(b, t)``.
        clip_range, clip_range_high, dual_clip: see :func:`clipped_surrogate_objective`.
        aggregation, horizon: see :func:`aggregate_loss`.

    Returns:
        The scalar loss, and detached stats: ``clipfrac`` (share of valid tokens where the clipped term is the
        active, strictly smaller one), ``dual_clipfrac`` (share where the dual clip's bound is active),
        ``approxkl`` (``0.5·mean((log π − log π_old)²)``, as in Huang et al. 2023) and ``ratio_mean``.
    """
    mask = response_mask.bool()
    # Zero the log-ratio at padding *before* exp: exp(garbage) = inf would turn masked gradients into nan.
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    objective = clipped_surrogate_objective(ratio, advantages, clip_range, clip_range_high, dual_clip)
    loss = -aggregate_loss(objective, mask, aggregation, horizon)
    with torch.no_grad():
        unclipped = ratio * advantages
        single_clipped = clipped_surrogate_objective(ratio, advantages, clip_range, clip_range_high)
        stats = {
            "clipfrac": masked_mean((single_clipped < unclipped).to(ratio.dtype), mask),
            "dual_clipfrac": masked_mean((objective > single_clipped).to(ratio.dtype), mask),
            "approxkl": 0.5 * masked_mean(log_ratio.square(), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


K3_CLAMP = 10.0  # verl clamps its low-variance KL to [−10, 10] after NaN reports (verl#751, PR #1779)


def kl_loss_per_token(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``(b, t)`` k3 estimate of KL(π ‖ π_ref), differentiable in ``logprobs``, clamped to ±K3_CLAMP: the KL as a
    loss term (GRPO, Shao et al. 2024) instead of a reward penalty. k3 rather than k1: k1's gradient as a loss is
    biased (arXiv:2506.09477); the clamp bounds exp(log π_ref − log π) when a token's probability collapses."""
    return kl_per_token(logprobs, ref_logprobs, "k3").clamp(-K3_CLAMP, K3_CLAMP)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, response_mask: Tensor, clip_range_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``0.5·mean(max((V − R)², (clip(V, V_old ± ε_v) − R)²))`` (docs/design.md §4.2).

    The value head may not move more than ε_v from its rollout-time estimate in one PPO phase; taking the
    max of the two errors is the pessimistic choice (as in OpenAI baselines; Huang et al. 2023).

    Args:
        values: ``(b, t)`` current value predictions (with gradient).
        old_values: ``(b, t)`` predictions at rollout time.
        returns: ``(b, t)`` targets from :func:`gae_advantages`.
        response_mask: ``(b, t)``.
        clip_range_value: ε_v.

    Returns:
        The scalar loss (without the c1 coefficient) and detached stats: ``clipfrac`` (share of valid tokens
        where the clipped error is the larger one) and ``mean_value``.
    """
    mask = response_mask.bool()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped_error > unclipped_error).to(values.dtype), mask),
            "mean_value": masked_mean(values, mask),
        }
    return loss, stats


# --- KL coefficient controllers ----------------------------------------------------------------------------------


class FixedKLController:
    """A constant β."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: β stays fixed."""


class AdaptiveKLController:
    """Proportional controller steering the observed KL towards a target (Ziegler et al. 2019, §2.2).

    ``e = clip(KL / target − 1, −0.2, 0.2)``; ``β ← β·(1 + e·n_steps / horizon)``. The clip bounds the change
    per update, so one noisy KL estimate cannot swing β.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target=} {horizon=}")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """``current_kl``: mean sequence KL of the last batch; ``n_steps``: episodes in that batch."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def make_kl_controller(
    init_kl_coef: float, adaptive: bool, target: float, horizon: int
) -> FixedKLController | AdaptiveKLController:
    """The controller the config asks for; ``target`` and ``horizon`` are used only when ``adaptive``."""
    if adaptive:
        return AdaptiveKLController(init_kl_coef, target, horizon)
    return FixedKLController(init_kl_coef)
