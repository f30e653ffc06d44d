"""The PPO training loop (DESIGN §4), rank-aware under accelerate.

Launch: ``accelerate launch --config_file configs/cpu-1proc.yaml -m tasks.ppo`` (the `ppo` DVC stage does this).
Each iteration reads top to bottom: 1. sample prompts, 2. generate, 3. truncate after EOS, 4. score and evaluate the
old policy/reference/critic, 5. rewards, 6. advantages, 7. K epochs of minibatch updates, 8. KL controller,
9. metrics. The math lives in :mod:`rlhf.ppo` as small tested functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf import ppo
from rlhf.config import PPOConfig
from rlhf.modeling import RewardNormalization, encode_prompts, position_ids_from_mask
from rlhf.rollout import Experience, generate_responses, response_logprobs, response_values, reward_scores


class PolicyAndCritic(nn.Module):
    """Policy and critic trained together: one module so one DDP wrapper syncs both in one backward."""

    def __init__(self, policy: PreTrainedModel, critic: PreTrainedModel):
        super().__init__()
        self.policy = policy
        self.critic = critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, q+t) ids → policy logits (b, q+t, vocab) and critic values (b, q+t)."""
        position_ids = position_ids_from_mask(attention_mask)
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
        hidden = self.critic.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
        return logits, self.critic.score(hidden).squeeze(-1)


@dataclass
class PPOModels:
    policy: PreTrainedModel  # trained; initialised from SFT
    reference: PreTrainedModel  # frozen SFT copy for the KL penalty
    critic: PreTrainedModel  # trained; initialised from the reward model (or with a zero head)
    reward_model: PreTrainedModel  # frozen
    reward_normalization: RewardNormalization
    tokenizer: PreTrainedTokenizerBase


def shard_for_rank(items: list, rank: int, world_size: int) -> list:
    """Every process gets a disjoint, equal-sized slice (the tail that does not divide evenly is dropped)."""
    usable = len(items) - len(items) % world_size
    return items[rank:usable:world_size]


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(n, start + size)) for start in range(0, n, size)]


@torch.no_grad()
def collect_experience(
    models: PPOModels,
    trainable: PolicyAndCritic,
    prompts: list[str],
    config: PPOConfig,
    forward_batch_size: int,
    device: torch.device,
) -> Experience:
    """Steps 2–4: generate, truncate after EOS, then old logprobs, reference logprobs, values and RM scores."""
    tokenizer = models.tokenizer
    query_ids, query_mask = (t.to(device) for t in encode_prompts(tokenizer, prompts))
    # 2. generate with the KV cache
    raw_responses = generate_responses(
        trainable.policy, query_ids, query_mask, config.response_length, config.temperature, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    # 3. EOS trick: everything after the first EOS is padding and masked
    responses, response_mask, contains_eos = ppo.truncate_after_stop_token(raw_responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    # 4. forwards in chunks (memory stays bounded for real models)
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref_logprobs": [], "values": [], "scores": []}
    for rows in _chunks(len(prompts), forward_batch_size):
        args = (query_ids[rows], query_mask[rows], responses[rows], response_mask[rows])
        parts["logprobs"].append(response_logprobs(trainable.policy, *args, config.temperature)[0])
        parts["ref_logprobs"].append(response_logprobs(models.reference, *args, config.temperature)[0])
        parts["values"].append(response_values(trainable.critic, *args))
        parts["scores"].append(reward_scores(models.reward_model, models.reward_normalization, *args))
    merged = {name: torch.cat(tensors) for name, tensors in parts.items()}
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


def add_advantages(experience: Experience, config: PPOConfig, kl_coef: float, all_reduce_sum: ppo.AllReduceSum) -> Experience:
    """Steps 5–6: per-token rewards (−β·KL, RM score at the last real token), GAE, whitened advantages."""
    mask = experience.response_mask
    rewards, kl, _ = ppo.compute_rewards(experience.scores, experience.logprobs, experience.ref_logprobs, mask, kl_coef, config.kl_estimator)
    if config.whiten_rewards:
        rewards = ppo.masked_whiten(rewards, mask, shift_mean=False, all_reduce_sum=all_reduce_sum)
    advantages, returns = ppo.gae_advantages(rewards, experience.values, mask, config.gamma, config.lam)
    experience.rewards, experience.kl, experience.returns = rewards, kl, returns
    experience.advantages = ppo.masked_whiten(advantages, mask, all_reduce_sum=all_reduce_sum)
    return experience


def ppo_minibatch_loss(
    trainable: nn.Module, batch: Experience, config: PPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step 7 for one micro-batch: clipped surrogate + c1 · clipped value loss − c2 · entropy."""
    input_ids = torch.cat([batch.query_ids, batch.responses], dim=1)
    attention_mask = torch.cat([batch.query_mask, batch.response_mask.long()], dim=1)
    logits, values = trainable(input_ids, attention_mask)
    query_length = batch.query_ids.shape[1]
    response_logits = logits[:, query_length - 1 : -1]
    new_values = values[:, query_length - 1 : -1]
    logprobs = ppo.logprobs_from_logits(response_logits, batch.responses, config.temperature)
    entropy = ppo.entropy_from_logits(response_logits, config.temperature)
    mask = batch.response_mask
    pg_loss, pg_stats = ppo.policy_loss(logprobs, batch.logprobs, batch.advantages, mask, config.clip_range)
    vf_loss, vf_stats = ppo.value_loss(new_values, batch.values, batch.returns, mask, config.clip_range_value)
    mean_entropy = ppo.masked_mean(entropy, mask)
    loss = pg_loss + config.vf_coef * vf_loss - config.ent_coef * mean_entropy
    stats = {
        "ppo/loss/policy": pg_loss.detach(),
        "ppo/loss/value": vf_loss.detach(),
        "ppo/loss/total": loss.detach(),
        "ppo/policy/entropy": mean_entropy.detach(),
        "ppo/policy/approxkl": pg_stats["approxkl"],
        "ppo/policy/clipfrac": pg_stats["clipfrac"],
        "ppo/val/clipfrac": vf_stats["clipfrac"],
        "ppo/val/vpred": vf_stats["mean_value"],
    }
    return loss, stats


def train_ppo(
    models: PPOModels,
    prompts: list[str],
    config: PPOConfig,
    seed: int,
    accelerator: Accelerator,
    log: Callable[[dict], None] = lambda record: None,
) -> list[dict]:
    """Train ``models.policy`` and ``models.critic`` in place; returns the per-iteration metric history."""
    world_size, rank = accelerator.num_processes, accelerator.process_index
    sizes = config.derived(world_size)
    local_prompts = shard_for_rank(prompts, rank, world_size)
    if len(local_prompts) < sizes["local_batch_size"]:
        raise ValueError(f"{len(prompts)} prompts cannot fill ppo.rollout_batch_size={config.rollout_batch_size}")
    all_reduce_sum = (lambda t: accelerator.reduce(t, reduction="sum")) if world_size > 1 else None

    def global_mean(value: torch.Tensor) -> float:
        return float(accelerator.reduce(value.detach().float().to(accelerator.device), reduction="mean")) if world_size > 1 else float(value)

    trainable = PolicyAndCritic(models.policy, models.critic)
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=config.learning_rate, eps=1e-5)
    trainable, optimizer = accelerator.prepare(trainable, optimizer)
    device = accelerator.device
    models.reference.to(device).eval()
    models.reward_model.to(device).eval()
    kl_controller = ppo.make_kl_controller(config.kl_coef, config.adaptive_kl, config.kl_target, config.kl_horizon)
    # seeds differ per rank so processes sample different responses (and prompts) — N implementation details §"seeds"
    torch.manual_seed(seed * 1000 + rank)
    prompt_generator = torch.Generator().manual_seed(seed * 1000 + rank)
    shuffle_generator = torch.Generator().manual_seed(seed * 1000 + rank + 1)
    history: list[dict] = []
    for iteration in range(config.iterations):
        timings: dict[str, float] = {}
        started = time.perf_counter()
        if config.anneal_lr:
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * (1.0 - iteration / config.iterations)
        # 1. sample this process's prompts
        index = torch.randperm(len(local_prompts), generator=prompt_generator)[: sizes["local_batch_size"]].tolist()
        batch_prompts = [local_prompts[i] for i in index]
        # 2–4. generate, truncate, score, evaluate old policy / reference / critic
        unwrapped = accelerator.unwrap_model(trainable)
        unwrapped.eval()
        experience = collect_experience(models, unwrapped, batch_prompts, config, sizes["local_minibatch_size"], device)
        timings["timing/rollout"] = time.perf_counter() - started
        # 5–6. rewards and advantages (whitening statistics are global across processes)
        kl_coef = kl_controller.value
        experience = add_advantages(experience, config, kl_coef, all_reduce_sum)
        # 7. K epochs over shuffled minibatches, gradient accumulation over micro-batches
        optimise_started = time.perf_counter()
        trainable.train()
        step_stats: dict[str, list[torch.Tensor]] = {}
        for _ in range(config.ppo_epochs):
            order = torch.randperm(sizes["local_batch_size"], generator=shuffle_generator)
            for minibatch in order.split(sizes["local_minibatch_size"]):
                for micro in minibatch.split(sizes["micro_batch_size"]):
                    with accelerator.accumulate(trainable):
                        loss, stats = ppo_minibatch_loss(trainable, experience.select(micro.to(device)), config)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(trainable.parameters(), config.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    for name, value in stats.items():
                        step_stats.setdefault(name, []).append(value)
        timings["timing/optimise"] = time.perf_counter() - optimise_started
        # 8. adaptive KL controller on the global mean sequence KL
        mask = experience.response_mask.float()
        sequence_kl = global_mean((experience.kl * mask).sum(1).mean())
        kl_controller.update(sequence_kl, config.rollout_batch_size)
        # 9. metrics with the field's usual names, averaged over processes
        non_score = float(-kl_coef * sequence_kl)
        scores_mean = global_mean(experience.scores.mean())
        record = {
            "step": iteration + 1,
            "total": config.iterations,
            "episodes": (iteration + 1) * config.rollout_batch_size,
            "objective/kl": sequence_kl,
            "objective/kl_coef": kl_coef,
            "objective/scores": scores_mean,
            "objective/non_score_reward": non_score,
            "objective/rlhf_reward": scores_mean + non_score,
            "objective/entropy": global_mean(-(experience.logprobs * mask).sum(1).mean()),
            "val/num_eos_tokens": global_mean(experience.contains_eos.float().sum()) * world_size,
            "val/response_length": global_mean(mask.sum(1).mean()),
            "lr": optimizer.param_groups[0]["lr"],
        }
        record.update({name: global_mean(torch.stack(values).mean()) for name, values in step_stats.items()})
        timings["timing/iteration"] = time.perf_counter() - started
        record.update(timings)
        record["eps"] = config.rollout_batch_size / timings["timing/iteration"]
        history.append(record)
        if accelerator.is_main_process:
            log(record)
    accelerator.wait_for_everyone()
    return history
