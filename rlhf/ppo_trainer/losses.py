"""PPO's loss on one micro-batch (docs/design.md §4): the policy's side (clipped surrogate − c2 · entropy) and the
value model's side (c1 · clipped value loss), over disjoint parameters; the math lives in :mod:`rlhf.ppo`."""

from __future__ import annotations

import torch
from torch import nn

from rlhf import ppo
from rlhf.config import PPOConfig
from rlhf.distributed import token_weight
from rlhf.rollout import Experience, joined


def model_inputs(batch: Experience) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, q + t) ids and attention mask of query and response."""
    return joined(batch.query_ids, batch.query_mask, batch.responses, batch.response_mask)


def policy_side_loss(
    response_logits: torch.Tensor, batch: Experience, config: PPOConfig, kl_coef: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(b, t, vocab) logits → clipped surrogate − c2 · entropy (+ β · k3 KL with ``kl_penalty: loss``): the terms
    whose gradient reaches the policy, each aggregated by ``loss_aggregation`` (docs/design.md §4b)."""
    logprobs = ppo.logprobs_from_logits(response_logits, batch.responses, config.temperature)
    # without an entropy bonus the entropy is only reported: keep it out of the graph (no backward through it)
    entropy = ppo.entropy_from_logits(
        response_logits if config.ent_coef else response_logits.detach(), config.temperature
    )
    mask, aggregation, horizon = batch.response_mask, config.loss_aggregation, config.response_length
    pg_loss, pg_stats = ppo.policy_loss(
        logprobs,
        batch.logprobs,
        batch.advantages,
        mask,
        config.clip_range,
        config.clip_range_high,
        config.dual_clip,
        aggregation,
        horizon,
    )
    mean_entropy = ppo.masked_mean(entropy, mask)
    stats = {
        "ppo/loss/policy": pg_loss.detach(),
        "ppo/policy/entropy": mean_entropy.detach(),
        "ppo/policy/approxkl": pg_stats["approxkl"],
        "ppo/policy/clipfrac": pg_stats["clipfrac"],
    }
    if config.dual_clip:
        stats["ppo/policy/dual_clipfrac"] = pg_stats["dual_clipfrac"]
    entropy_term = (
        mean_entropy if aggregation == "token-mean" else ppo.aggregate_loss(entropy, mask, aggregation, horizon)
    )
    loss = pg_loss - config.ent_coef * entropy_term
    if config.kl_penalty == "loss":
        kl_loss = ppo.aggregate_loss(ppo.kl_loss_per_token(logprobs, batch.ref_logprobs), mask, aggregation, horizon)
        stats["ppo/loss/kl"] = kl_loss.detach()
        loss = loss + kl_coef * kl_loss
    return loss, stats


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
    trainable: nn.Module,
    batch: Experience,
    config: PPOConfig,
    weights: tuple[float, float] = (1.0, 1.0),
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's loss, w_p · (clipped surrogate − c2 · entropy) + w_v · c1 · clipped value loss, from one
    joint forward of the (wrapped) trainable module; ``weights`` = (w_p, w_v), the micro-batch's shares of its
    minibatch (:func:`micro_batch_weights`). :func:`~rlhf.ppo_trainer.optimise.optimise` backpropagates it, except
    on one process with a lean policy + critic, where
    :func:`~rlhf.ppo_trainer.memory.policy_then_critic_backward` computes the same two terms one model at a time.
    A critic-free module (:class:`~rlhf.ppo_trainer.models.PolicyOnly`) has the policy term alone."""
    input_ids, attention_mask = model_inputs(batch)
    response_logits, new_values = trainable(input_ids, attention_mask, response_start=batch.query_ids.shape[1])
    policy_loss, policy_stats = policy_side_loss(response_logits, batch, config, kl_coef)
    if new_values is None:
        return policy_loss * weights[0], {**policy_stats, "ppo/loss/total": policy_loss.detach()}
    value_loss, value_stats = value_side_loss(new_values, batch, config)
    loss = policy_loss + value_loss
    # equal weights: one product, as before the weights were split (the same bits as the joint loss × weight)
    weighted = loss * weights[0] if weights[0] == weights[1] else policy_loss * weights[0] + value_loss * weights[1]
    return weighted, {**policy_stats, **value_stats, "ppo/loss/total": loss.detach()}


def micro_batch_weights(
    micro: Experience, minibatch_units: tuple[int, int], config: PPOConfig, world_size: int
) -> tuple[float, float]:
    """(w_p, w_v): the factors on a micro-batch's policy and value losses so that the summed gradient is the global
    minibatch's aggregate (rlhf.distributed.token_weight). The policy's units follow ``loss_aggregation`` (tokens or
    sequences); the value loss is always a token mean. ``minibatch_units`` = (policy units, valid tokens)."""
    accumulation = config.gradient_accumulation_steps
    policy_units = ppo.loss_units(micro.response_mask, config.loss_aggregation)
    tokens = int(micro.response_mask.sum())
    return (
        token_weight(policy_units, minibatch_units[0], world_size, accumulation),
        token_weight(tokens, minibatch_units[1], world_size, accumulation),
    )
