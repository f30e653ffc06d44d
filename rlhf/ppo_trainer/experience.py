"""Steps 1–6 of a PPO iteration: prompts, generation, truncation after EOS, scoring, rewards and advantages.

A rollout batch is an :class:`rlhf.rollout.Experience`: this process's episodes after :func:`collect_experience`, the
global batch after :func:`rlhf.ppo_trainer.processes.gather_experience`.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator
from torch import nn

from rlhf import advantages as estimators
from rlhf import ppo
from rlhf.config import PPOConfig
from rlhf.distributed import full_parameters, shard_for_rank
from rlhf.modeling import encode_prompts
from rlhf.ppo_trainer.memory import Bf16Weights
from rlhf.ppo_trainer.models import PPOModels
from rlhf.rollout import Experience, joined, response_logprobs, response_values, reward_scores
from rlhf.sampling import decodes_in_fp32, sample


def iteration_prompts(
    prompts: list[str], config: PPOConfig, streams: dict[str, torch.Generator], rank: int, world_size: int
) -> tuple[list[str], torch.Tensor | None]:
    """Step 1: the global batch, drawn from the stream all ranks share: rollout_batch_size / K distinct prompts, each
    K = ``group_size`` times in a row (prompt-major: episodes g·K … g·K + K − 1 are prompt g's group), and this
    rank's episodes r, r+N, … of it; with ``sampling_seeds: per_episode`` also their (b, t) sampling uniforms."""
    n_prompts = config.rollout_batch_size // config.group_size
    batch_index = torch.randperm(len(prompts), generator=streams["prompts"])[:n_prompts].tolist()
    episodes = [prompts[i] for i in batch_index for _ in range(config.group_size)]
    local_prompts = shard_for_rank(episodes, rank, world_size)
    uniforms = None
    if config.sampling_seeds == "per_episode":
        uniforms = shard_for_rank(
            torch.rand(config.rollout_batch_size, config.response_length, generator=streams["uniforms"]),
            rank,
            world_size,
        )
    return local_prompts, uniforms


def roll_out(
    models: PPOModels,
    module: nn.Module,
    prompts: list[str],
    uniforms: torch.Tensor | None,
    config: PPOConfig,
    accelerator: Accelerator,
    bf16_weights: Bf16Weights | None = None,
) -> Experience:
    """Steps 2–4 on this process's prompts with the prepared (wrapped) ``module``: unwrapped, in eval mode, under
    autocast, with whole weights under FSDP (:func:`~rlhf.distributed.full_parameters`). With ``bf16_weights`` the
    forwards read its kept bf16 copies instead of casting the fp32 weights op by op (a policy the sampler decodes in
    fp32, :func:`rlhf.sampling.decodes_in_fp32`, keeps its fp32 weights)."""
    with full_parameters(accelerator, module), accelerator.autocast():
        unwrapped = accelerator.unwrap_model(module)
        unwrapped.eval()
        forward_batch_size = config.derived(accelerator.num_processes)["local_minibatch_size"]
        bf16_part = None
        if bf16_weights is not None:
            fp32_decode = decodes_in_fp32(unwrapped.policy, len(prompts), accelerator.device)
            bf16_part = getattr(unwrapped, "critic", None) if fp32_decode else unwrapped
        with bf16_weights.computing(bf16_part) if bf16_part is not None else contextlib.nullcontext():
            return collect_experience(
                models, unwrapped, prompts, config, forward_batch_size, accelerator.device, uniforms
            )


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(n, start + size)) for start in range(0, n, size)]


def policy_logprobs_and_values(
    trainable: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(b, t) log-probs of the response tokens (logits / temperature) and (b, t) values V(s_i) before each token
    (None for a critic-free module)."""
    input_ids, attention_mask = joined(query_ids, query_mask, responses, response_mask)
    # the logit at position i predicts token i+1: response tokens are predicted from q−1 … q+t−2
    logits, values = trainable(input_ids, attention_mask, response_start=query_ids.shape[1])
    return ppo.logprobs_from_logits(logits, responses, temperature), values


def reference_logprobs(
    models: PPOModels,
    policy: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """(b, t) log-probs under the frozen SFT reference: its own copy, or with LoRA the policy with the adapter off."""
    args = (query_ids, query_mask, responses, response_mask, temperature)
    if models.reference is not None:
        return response_logprobs(models.reference, *args)
    with policy.disable_adapter():  # peft: the frozen base weights are the SFT policy (TRL's PPO does the same)
        return response_logprobs(policy, *args)


@torch.no_grad()
def collect_experience(
    models: PPOModels,
    trainable: nn.Module,
    prompts: list[str],
    config: PPOConfig,
    forward_batch_size: int,
    device: torch.device,
    uniforms: torch.Tensor | None = None,
) -> Experience:
    """Steps 2–4: generate, truncate after EOS, then old logprobs, reference logprobs, values and RM scores.

    ``trainable``: the unwrapped :func:`~rlhf.ppo_trainer.models.trainable_module`; ``uniforms`` (b, t): per-episode
    sampling (:func:`rlhf.sampling.inverse_cdf`), None to sample from the global RNG. On the lean path (rlhf.lean) the
    sampler's own log-probs are the old log-probs (``rollout_logprobs: sampler``) and a value head reads the sampler's
    hidden states, so the policy is not run again; the batch is cut to its longest response.
    """
    tokenizer = models.tokenizer
    query_ids, query_mask = (t.to(device) for t in encode_prompts(tokenizer, prompts))
    value_head, lean = getattr(trainable, "value_head", None), getattr(trainable, "lean", False)
    # 2. generate with the KV cache: the lean decoder when the trainable module runs lean, which also records the
    # old log-probs and a value head's inputs; otherwise generate(), except that without uniforms a policy the lean
    # decoder supports still takes it (FSDP, DeepSpeed: only the training forwards must leave the lean path)
    sampled = sample(
        trainable.policy,
        query_ids,
        query_mask,
        config.response_length,
        config.temperature,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        uniforms=None if uniforms is None else uniforms.to(device),
        keep_hidden=lean and value_head is not None,
        lean=True if lean else None if uniforms is None else False,
    )
    sampled_logprobs = sampled_values = None
    if lean and config.rollout_logprobs == "sampler":
        sampled_logprobs = sampled.logprobs
        if value_head is not None:
            sampled_values = value_head(sampled.hidden.to(value_head.weight.dtype)).squeeze(-1)
    # 3. EOS trick: everything after the first EOS is padding and masked; columns past the longest response dropped
    responses, response_mask, contains_eos = ppo.truncate_after_stop_token(
        sampled.responses, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    columns = max(1, int(response_mask.sum(1).max()))
    responses, response_mask = responses[:, :columns], response_mask[:, :columns]
    # 4. forwards in chunks (memory stays bounded for real models)
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref_logprobs": [], "values": [], "scores": []}
    for rows in _chunks(len(prompts), forward_batch_size):
        args = (query_ids[rows], query_mask[rows], responses[rows], response_mask[rows])
        if sampled_logprobs is None:
            logprobs, values = policy_logprobs_and_values(trainable, *args, config.temperature)
        else:
            logprobs = sampled_logprobs[rows, :columns]
            values = None  # critic-free: no value model
            if sampled_values is not None:
                values = sampled_values[rows, :columns]
            elif getattr(trainable, "critic", None) is not None:
                values = response_values(trainable.critic, *args)
        parts["logprobs"].append(logprobs)
        parts["values"].append(values if values is not None else torch.zeros_like(logprobs))
        parts["ref_logprobs"].append(reference_logprobs(models, trainable.policy, *args, config.temperature))
        if models.reward_rule is None:
            parts["scores"].append(reward_scores(models.reward_model, models.reward_normalization, *args))
    if models.reward_rule is not None:  # a rule scores the text: (prompt, response) -> float, checked in check_rollout
        texts = tokenizer.batch_decode(
            responses.masked_fill(~response_mask, tokenizer.pad_token_id).cpu(), skip_special_tokens=True
        )
        rule_scores = [float(models.reward_rule(prompt, text)) for prompt, text in zip(prompts, texts)]
        parts["scores"] = [torch.tensor(rule_scores, device=device)]
    merged = {name: torch.cat(tensors).float() for name, tensors in parts.items()}
    mask = response_mask.float()
    scores = torch.where(contains_eos, merged["scores"], torch.full_like(merged["scores"], config.missing_eos_score))
    return Experience(
        query_ids=query_ids,
        query_mask=query_mask,
        responses=responses,
        response_mask=response_mask,
        logprobs=merged["logprobs"] * mask,
        ref_logprobs=merged["ref_logprobs"] * mask,
        values=merged["values"] * mask,
        scores=scores,
        contains_eos=contains_eos,
    )


def add_advantages(
    experience: Experience, config: PPOConfig, kl_coef: float, all_reduce_sum: ppo.AllReduceSum
) -> Experience:
    """Steps 5–6 of PPO: per-token rewards (−β·KL, RM score at the last real token), GAE, whitened advantages.

    On this process's episodes; the whitening statistics are global (``all_reduce_sum``). With ``lam_critic`` the
    value targets come from a second GAE with their own λ (VAPO: λ_critic = 1 gives unbiased returns for the
    critic while the actor keeps λ < 1's lower variance)."""
    mask = experience.response_mask
    rewards, kl, _ = ppo.compute_rewards(
        experience.scores,
        experience.logprobs,
        experience.ref_logprobs,
        mask,
        reward_kl_coef(config, kl_coef),
        config.kl_estimator,
    )
    if config.whiten_rewards:
        rewards = ppo.masked_whiten(rewards, mask, shift_mean=False, all_reduce_sum=all_reduce_sum)
    advantages, returns = ppo.gae_advantages(rewards, experience.values, mask, config.gamma, config.lam)
    if config.lam_critic is not None and config.lam_critic != config.lam:
        _, returns = ppo.gae_advantages(rewards, experience.values, mask, config.gamma, config.lam_critic)
    experience.rewards, experience.kl, experience.returns = rewards, kl, returns
    experience.advantages = ppo.masked_whiten(advantages, mask, all_reduce_sum=all_reduce_sum)
    return experience


def reward_kl_coef(config: PPOConfig, kl_coef: float) -> float:
    """β of the KL penalty in the reward: the controller's, or 0 when the KL is a loss term (``kl_penalty: loss``)."""
    return kl_coef if config.kl_penalty == "reward" else 0.0


def add_critic_free_advantages(batch: Experience, config: PPOConfig, kl_coef: float) -> Experience:
    """Steps 5–6 of grpo, rloo and reinforce_pp on the GATHERED global batch (the groups and the batch statistics
    span processes; every rank computes the same numbers). Values and returns are 0: there is no value model."""
    mask = batch.response_mask
    beta = reward_kl_coef(config, kl_coef)
    rewards, kl, _ = ppo.compute_rewards(
        batch.scores, batch.logprobs, batch.ref_logprobs, mask, beta, config.kl_estimator
    )
    if config.algorithm == "reinforce_pp":
        advantages = estimators.reinforce_pp_advantages(rewards, mask, config.gamma)
    else:
        sequence = estimators.sequence_rewards(batch.scores, kl, mask, beta)
        if config.algorithm == "grpo":
            sequence_advantages = estimators.grpo_advantages(sequence, config.group_size, config.group_std_normalise)
        else:
            sequence_advantages = estimators.rloo_advantages(sequence, config.group_size)
        advantages = estimators.per_token(sequence_advantages, mask)
    batch.rewards, batch.kl, batch.advantages = rewards, kl, advantages
    batch.returns = torch.zeros_like(advantages)
    return batch


def without_uniform_groups(batch: Experience, group_size: int) -> tuple[Experience, float]:
    """The batch for the update with the episodes of groups that all scored alike masked out (``filter_uniform_groups``,
    DAPO), and the share of groups dropped. The rows stay (shapes and the minibatch cuts do not change) with no
    valid token, so they add nothing to any loss or weight."""
    alike = estimators.uniform_groups(batch.scores, group_size)
    kept = Experience(**vars(batch))
    kept.response_mask = batch.response_mask & ~alike.unsqueeze(-1)
    return kept, float(alike.float().mean())


def rollout_metrics(batch: Experience, kl_coef: float, group_size: int = 1) -> dict[str, float]:
    """Metrics of the global rollout batch, with the field's usual names (logged with step 8); with groups also the
    share of distinct responses within a prompt's group (1 = all K differ; mode collapse drives it towards 1/K)."""
    mask = batch.response_mask.float()
    extra = {"rollout/group_distinct": group_distinct(batch.responses, group_size)} if group_size > 1 else {}
    sequence_kl = float((batch.kl * mask).sum(1).mean())
    scores_mean = float(batch.scores.mean())
    non_score = float(-kl_coef * sequence_kl)
    return {
        "objective/kl": sequence_kl,
        "objective/kl_coef": kl_coef,
        "objective/scores": scores_mean,
        "objective/non_score_reward": non_score,
        "objective/rlhf_reward": scores_mean + non_score,
        "objective/entropy": float(-(batch.logprobs * mask).sum(1).mean()),
        "val/num_eos_tokens": float(batch.contains_eos.float().sum()),
        "val/response_length": float(mask.sum(1).mean()),
        "rollout/query_length": batch.query_ids.shape[1],  # padded columns: what the forwards process
        "rollout/response_columns": batch.responses.shape[1],
        "rollout/generated_tokens": batch.responses.numel(),  # sampled tokens, EOS-ended rows included
        **extra,
    }


def group_distinct(responses: torch.Tensor, group_size: int) -> float:
    """Mean over groups of (distinct responses in the group) / K; ``responses`` (b, t) with pad after the EOS."""
    rows = [tuple(row) for row in responses.tolist()]
    groups = [rows[start : start + group_size] for start in range(0, len(rows), group_size)]
    return sum(len(set(group)) for group in groups) / (len(groups) * group_size)
