"""PPO's loss on one micro-batch (docs/design.md §4): the policy's side (clipped surrogate − c2 · entropy) and the
value model's side (c1 · clipped value loss), over disjoint parameters; the math lives in :mod:`rlhf.ppo`."""

from __future__ import annotations

import torch
from torch import nn

from rlhf import ppo
from rlhf.config import PPOConfig
from rlhf.rollout import Experience, joined


def model_inputs(batch: Experience) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, q + t) ids and attention mask of query and response."""
    return joined(batch.query_ids, batch.query_mask, batch.responses, batch.response_mask)


def policy_side_loss(
    response_logits: torch.Tensor, batch: Experience, config: PPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(b, t, vocab) logits → clipped surrogate − c2 · entropy (the terms whose gradient reaches the policy)."""
    logprobs = ppo.logprobs_from_logits(response_logits, batch.responses, config.temperature)
    # without an entropy bonus the entropy is only reported: keep it out of the graph (no backward through it)
    entropy = ppo.entropy_from_logits(
        response_logits if config.ent_coef else response_logits.detach(), config.temperature
    )
    pg_loss, pg_stats = ppo.policy_loss(
        logprobs, batch.logprobs, batch.advantages, batch.response_mask, config.clip_range
    )
    mean_entropy = ppo.masked_mean(entropy, batch.response_mask)
    stats = {
        "ppo/loss/policy": pg_loss.detach(),
        "ppo/policy/entropy": mean_entropy.detach(),
        "ppo/policy/approxkl": pg_stats["approxkl"],
        "ppo/policy/clipfrac": pg_stats["clipfrac"],
    }
    return pg_loss - config.ent_coef * mean_entropy, stats


def value_side_loss(
    new_values: torch.Tensor, batch: Experience, config: PPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(b, t) values → c1 · clipped value loss (the term whose gradient reaches the critic or value head)."""
    vf_loss, vf_stats = ppo.value_loss(
        new_values, batch.values, batch.returns, batch.response_mask, config.clip_range_value
    )
    stats = {
        "ppo/loss/value": vf_loss.detach(),
        "ppo/val/clipfrac": vf_stats["clipfrac"],
        "ppo/val/vpred": vf_stats["mean_value"],
    }
    return config.vf_coef * vf_loss, stats


def ppo_minibatch_loss(
    trainable: nn.Module, batch: Experience, config: PPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's loss, clipped surrogate + c1 · clipped value loss − c2 · entropy, from one joint forward of
    the (wrapped) trainable module. :func:`~rlhf.ppo_trainer.optimise.optimise` backpropagates it, except on one
    process with a lean policy + critic, where :func:`~rlhf.ppo_trainer.bf16.policy_then_critic_backward` computes the
    same two terms one model at a time."""
    input_ids, attention_mask = model_inputs(batch)
    response_logits, new_values = trainable(input_ids, attention_mask, response_start=batch.query_ids.shape[1])
    policy_loss, policy_stats = policy_side_loss(response_logits, batch, config)
    value_loss, value_stats = value_side_loss(new_values, batch, config)
    loss = policy_loss + value_loss
    return loss, {**policy_stats, **value_stats, "ppo/loss/total": loss.detach()}
