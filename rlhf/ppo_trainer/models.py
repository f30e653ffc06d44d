"""The models PPO trains and reads: policy, reference, value model (a separate critic or a head on the policy's trunk)
and reward model (:class:`PPOModels`, :func:`load_ppo_models`), and the one module the optimiser trains
(:func:`trainable_module`): policy + critic, or policy + value head, so one DDP wrapper syncs both in one backward.

On a plain GPT-2 or Llama-family model (:func:`rlhf.lean.supports`) the forwards take the lean path; ``lean`` is
switched off under FSDP and DeepSpeed (:func:`rlhf.ppo_trainer.optimise.prepare_training`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf import lean
from rlhf.annotators import load_callable
from rlhf.config import PPOConfig
from rlhf.modeling import (
    RewardNormalization,
    add_lora,
    causal_lm_logits,
    enable_gradient_checkpointing,
    load_policy,
    load_scalar_model,
    load_tokenizer,
    position_ids_from_mask,
    value_head_for,
)


class PolicyAndCritic(nn.Module):
    """Policy and a separate critic trained together: one module so one DDP wrapper syncs both in one backward."""

    def __init__(self, policy: PreTrainedModel, critic: PreTrainedModel):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.lean = lean.supports(policy) and lean.supports(critic)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, s) ids → policy logits (b, s', vocab) and critic values (b, s'): every position (s' = s), or with
        ``response_start`` = q only the positions q−1 … s−2 that predict the response tokens (s' = s − q)."""
        keep = slice(None) if response_start is None else slice(response_start - 1, -1)
        if self.lean:
            return self.policy_logits(input_ids, attention_mask, response_start), self.critic_values(
                input_ids, attention_mask, response_start
            )
        position_ids = position_ids_from_mask(attention_mask)
        logits = self.policy(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits
        hidden = self.critic.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return logits[:, keep], self.critic.score(hidden[:, keep]).squeeze(-1)

    def policy_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int | None = None
    ) -> torch.Tensor:
        """Lean path only: the policy half of :meth:`forward` (the LM head only where it is read)."""
        keep = slice(None) if response_start is None else slice(response_start - 1, -1)
        return lean.lm_logits(self.policy, lean.full_forward(self.policy, input_ids, attention_mask)[:, keep])

    def critic_values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int | None = None
    ) -> torch.Tensor:
        """Lean path only: the critic half of :meth:`forward`."""
        keep = slice(None) if response_start is None else slice(response_start - 1, -1)
        return self.critic.score(lean.full_forward(self.critic, input_ids, attention_mask)[:, keep]).squeeze(-1)


class PolicyWithValueHead(nn.Module):
    """Policy whose last hidden state also feeds a linear value head: one trunk, one forward for logits and values.

    The shared-trunk design of TRL's ``AutoModelForCausalLMWithValueHead``; the value loss (× vf_coef) then also
    shapes the policy's features.
    """

    def __init__(self, policy: nn.Module, value_head: nn.Linear):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.lean = lean.supports(policy)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, s) ids → policy logits (b, s', vocab) and values (b, s'); ``response_start`` as in PolicyAndCritic."""
        keep = slice(None) if response_start is None else slice(response_start - 1, -1)
        if self.lean:
            hidden = lean.full_forward(self.policy, input_ids, attention_mask)[:, keep]
            return lean.lm_logits(self.policy, hidden), self.value_head(
                hidden.to(self.value_head.weight.dtype)
            ).squeeze(-1)
        output = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            output_hidden_states=True,
        )
        hidden = output.hidden_states[-1][:, keep]  # after the final layer norm, the input of the LM head
        return output.logits[:, keep], self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)


class PolicyOnly(nn.Module):
    """The policy alone, for the critic-free algorithms (grpo, rloo, reinforce_pp): no value model is loaded or
    trained, which is where their memory saving comes from. Returns no values."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.lean = lean.supports(policy)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int | None = None
    ) -> tuple[torch.Tensor, None]:
        """(b, s) ids → policy logits (b, s', vocab) and None; ``response_start`` as in PolicyAndCritic."""
        keep = slice(None) if response_start is None else slice(response_start - 1, -1)
        if self.lean:
            return lean.lm_logits(self.policy, lean.full_forward(self.policy, input_ids, attention_mask)[:, keep]), None
        return causal_lm_logits(self.policy, input_ids, attention_mask, lean=False)[:, keep], None


@dataclass
class PPOModels:
    policy: nn.Module  # trained; initialised from SFT (a peft model when LoRA is on)
    reference: PreTrainedModel | None  # frozen SFT copy for the KL penalty; None with LoRA (= policy, adapter disabled)
    critic: (
        PreTrainedModel | None
    )  # separate critic, trained; initialised from the RM (or a zero head); None with a value head
    reward_model: PreTrainedModel | None  # frozen; None when a rule scores the responses (ppo.reward)
    reward_normalization: RewardNormalization | None
    tokenizer: PreTrainedTokenizerBase
    value_head: nn.Linear | None = None  # value head on the policy trunk (value_model="head"), else None
    reward_rule: Callable[[str, str], float] | None = None  # ppo.reward = `module:callable` (prompt, response) → score


def trainable_module(models: PPOModels) -> nn.Module:
    """The one module the optimiser trains: policy + critic, policy + value head, or (critic-free) the policy."""
    if models.critic is None and models.value_head is None:
        return PolicyOnly(models.policy)
    if models.value_head is not None:
        return PolicyWithValueHead(models.policy, models.value_head)
    return PolicyAndCritic(models.policy, models.critic)


def load_ppo_models(config: PPOConfig, sft_path: str | Path, reward_path: str | Path) -> PPOModels:
    """Policy, reference, value model and reward model as the memory options in ``config`` ask."""
    tokenizer = load_tokenizer(sft_path)
    reward_model = normalization = reward_rule = None
    if config.reward == "model":
        reward_model = load_scalar_model(reward_path, tokenizer.pad_token_id).requires_grad_(False)
        normalization = RewardNormalization.load(reward_path)
    else:
        reward_rule = load_callable(config.reward)
    policy = load_policy(sft_path)
    reference = None if config.lora_rank else load_policy(sft_path).requires_grad_(False)
    critic = value_head = None
    if config.critic_free:
        pass  # no value model: the baseline is the group's or the batch's (rlhf/advantages.py)
    elif config.value_model == "critic":
        critic = load_scalar_model(reward_path, tokenizer.pad_token_id)
        if config.value_init == "zero":
            torch.nn.init.zeros_(critic.score.weight)
    else:
        head_source = None
        if config.value_init == "reward":  # the RM's head (the RM is loaded anyway unless a rule scores)
            head_source = reward_model or load_scalar_model(reward_path, tokenizer.pad_token_id)
        value_head = value_head_for(policy, head_source)
    if config.gradient_checkpointing:
        for model in (policy, critic):
            if model is not None:
                enable_gradient_checkpointing(model)
    if config.lora_rank:
        policy = add_lora(policy, config.lora_rank, config.lora_alpha, config.lora_target_modules)
    return PPOModels(policy, reference, critic, reward_model, normalization, tokenizer, value_head, reward_rule)
