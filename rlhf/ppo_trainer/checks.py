"""The non-finite guards of a PPO iteration: :func:`check_rollout` before the optimiser steps, :func:`check_update`
after. Either raises :class:`NonFiniteIteration` (a :class:`~rlhf.guards.NonFiniteError`) before the iteration is
logged or saved, so the last good resume checkpoint stays the one a rerun continues from."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from rlhf.config import PPOConfig
from rlhf.distributed import reduce_means
from rlhf.guards import NonFiniteError, first_non_finite
from rlhf.rollout import Experience


class NonFiniteIteration(NonFiniteError):
    """NaN/inf in a PPO iteration: names the iteration, the quantity and whether the optimiser had stepped."""

    def __init__(self, iteration: int, quantity: str, value: float | str, hint: str, when: str) -> None:
        self.stage, self.step, self.quantity, self.value = "ppo", iteration, quantity, value
        RuntimeError.__init__(
            self,
            f"ppo: non-finite {quantity} ({value}) at iteration {iteration}, {when}; this iteration is neither "
            f"logged nor saved, final outputs not written. Hint: {hint}",
        )


def divergence_hint(config: PPOConfig) -> str:
    return (
        f"lower ppo.learning_rate (now {config.learning_rate}) or ppo.max_grad_norm (now {config.max_grad_norm}) "
        "in params.yaml" + ('; or set ppo.mixed_precision: "no"' if config.mixed_precision != "no" else "")
    )


def check_rollout(batch: Experience, iteration: int, config: PPOConfig) -> None:
    """Before the optimiser steps: the global batch's scores, log-probs, values, rewards, advantages and returns are
    finite on the tokens that count (every process sees the same gathered batch, so all stop together)."""
    mask = batch.response_mask.bool()
    token = lambda tensor: tensor.masked_select(mask)  # noqa: E731 - padding may hold anything
    scores = first_non_finite(scores=batch.scores)
    if scores:
        hint = (
            "the reward model (models/reward) scored a response NaN/inf: "
            "check models/reward/reward_normalization.json and rerun the reward stage"
            if config.reward == "model"
            else f"the rule ppo.reward = {config.reward!r} returned NaN/inf for a response: make it return floats"
        )
        raise NonFiniteIteration(iteration, *scores, hint, "before the optimiser steps")
    found = first_non_finite(
        logprobs=token(batch.logprobs),
        ref_logprobs=token(batch.ref_logprobs),
        values=token(batch.values),
        rewards=token(batch.rewards),
        advantages=token(batch.advantages),
        returns=token(batch.returns),
    )
    if found:
        raise NonFiniteIteration(
            iteration,
            *found,
            divergence_hint(config) + " (the policy or value model diverged in an earlier iteration)",
            "before the optimiser steps",
        )


def check_update(record: dict, module: nn.Module, iteration: int, config: PPOConfig, accelerator: Accelerator) -> None:
    """After the optimiser steps: the losses (means over processes) and every trained weight are finite.

    A NaN loss makes NaN gradients and weights at once; a finite loss with an overflowing gradient can too, hence the
    weight check (one pass over the trained tensors; a sum over processes so sharded weights stop every rank).
    """
    found = first_non_finite(
        **{
            name.removeprefix("ppo/loss/") + "_loss": record[name]
            for name in ("ppo/loss/total", "ppo/loss/policy", "ppo/loss/value", "ppo/loss/kl")
            if name in record  # no value loss without a value model, a KL loss only with kl_penalty: loss
        }
    )
    if not found:
        trained = [p.detach() for p in module.parameters() if p.requires_grad]
        bad = torch.zeros((), device=accelerator.device)
        # fast path: a tensor holding NaN/inf has a non-finite sum (one reduction per tensor, far cheaper than isfinite
        # per element); count exactly only then (a finite sum can overflow)
        if trained and not bool(torch.stack([p.sum() for p in trained]).isfinite().all()):
            bad = torch.stack([(~torch.isfinite(p)).sum() for p in trained]).sum().float()
        count = reduce_means({"count": bad}, accelerator)["count"] * accelerator.num_processes
        found = ("weights", f"{round(count)} values") if count else None
    if found:
        raise NonFiniteIteration(
            iteration, *found, divergence_hint(config), "after its optimiser steps (its update is discarded)"
        )
