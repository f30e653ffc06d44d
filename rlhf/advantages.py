"""Critic-free advantage estimators: the baseline comes from the other samples of a prompt or from the batch, not
from a value model (docs/design.md §4b). Pure tensor functions, like :mod:`rlhf.ppo`.

Shapes: ``b`` episodes, ``t`` response tokens; a batch of groups holds ``b = n·K`` episodes, prompt-major: episodes
``g·K … g·K + K − 1`` are the K samples of prompt ``g`` (:func:`rlhf.ppo_trainer.experience.iteration_prompts`).

Sources:
- GRPO: Shao et al. 2024, "DeepSeekMath" (group-relative advantage (r − mean) / std, KL as a loss term).
- Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783 (no std division, no
  per-response length normalisation: both bias the update).
- RLOO: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
  Feedback in LLMs" (leave-one-out baseline).
- REINFORCE++: Hu 2025, arXiv:2501.03262 (token-level KL penalty in the reward, advantages normalised over the
  global batch).
- Filtering groups that all score alike: Yu et al. 2025, DAPO, arXiv:2503.14476 ("dynamic sampling").
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf import ppo

GROUP_STD_EPS = 1e-6  # added to a group's std: a group that scores alike gets advantage 0, not 0/0


def _grouped(sequence_rewards: Tensor, group_size: int) -> Tensor:
    """``(b,)`` → ``(b / K, K)``; ``b`` must be a multiple of K."""
    if group_size < 1 or sequence_rewards.numel() % group_size:
        raise ValueError(f"{sequence_rewards.numel()} episodes do not split into groups of {group_size}")
    return sequence_rewards.view(-1, group_size)


def sequence_rewards(scores: Tensor, kl: Tensor, response_mask: Tensor, kl_coef: float) -> Tensor:
    """``(b,)`` score − β·Σ_t KL_t: the whole-response reward of the group estimators, KL penalty included.

    Args:
        scores: ``(b,)`` reward (model or rule) per episode, missing-EOS penalty applied.
        kl: ``(b, t)`` per-token KL estimate (:func:`rlhf.ppo.kl_per_token`).
        response_mask: ``(b, t)``.
        kl_coef: β; 0 when the KL is a loss term instead.
    """
    return scores.float() - kl_coef * ppo.masked_sum(kl.float(), response_mask, dim=-1)


def grpo_advantages(rewards: Tensor, group_size: int, std_normalise: bool = True) -> Tensor:
    """``(b,)`` GRPO advantages: ``(r − mean_g) / (std_g + ε)`` within each group of K samples of a prompt.

    ``std_normalise=False`` is Dr. GRPO's ``r − mean_g``: dividing by a group's std up-weights prompts that are
    too easy or too hard (all samples alike), a bias. The std is the unbiased one (Bessel), as in the published
    implementations; a group of identical rewards gets 0 either way.
    """
    groups = _grouped(rewards.float(), group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if std_normalise:
        centred = centred / (groups.std(-1, keepdim=True) + GROUP_STD_EPS)
    return centred.reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """``(b,)`` RLOO advantages: ``r_i − mean_{j≠i} r_j``, each sample's baseline the mean of the group's others.

    Unbiased (the baseline does not depend on the sample it is subtracted from); equals ``K/(K−1)·(r_i − mean_g)``.
    """
    groups = _grouped(rewards.float(), group_size)
    others_mean = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).reshape(-1)


def reinforce_pp_advantages(token_rewards: Tensor, response_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """``(b, t)`` REINFORCE++ advantages: the discounted return-to-go of the per-token rewards (−β·KL_t, score at
    the last real token), whitened over every valid token of the global batch (no critic, no group).

    The return-to-go is GAE with V ≡ 0 and λ = 1 (:func:`rlhf.ppo.gae_advantages`); call on the gathered global
    batch, so the whitening statistics are the batch's.
    """
    returns, _ = ppo.gae_advantages(token_rewards, torch.zeros_like(token_rewards), response_mask, gamma, 1.0)
    return ppo.masked_whiten(returns, response_mask)


def uniform_groups(scores: Tensor, group_size: int, tolerance: float = 1e-6) -> Tensor:
    """``(b,)`` bool: True for every episode of a group whose K scores all agree within ``tolerance`` (max − min).

    Such a group has zero group-relative advantage: it carries no signal, yet it would dilute token and sequence
    means (DAPO's dynamic sampling filters them; this pipeline drops them from the update and logs the share).
    """
    groups = _grouped(scores.float(), group_size)
    alike = (groups.max(-1).values - groups.min(-1).values) <= tolerance
    return alike.repeat_interleave(group_size)


def per_token(sequence_advantages: Tensor, response_mask: Tensor) -> Tensor:
    """``(b,)`` → ``(b, t)``: every valid token of a response gets its sequence's advantage; 0 where masked."""
    return torch.where(response_mask.bool(), sequence_advantages.unsqueeze(-1), 0.0)
