"""The PPO training loop (DESIGN §4), the same optimisation on any number of processes under accelerate.

Launch (the `ppo` DVC stage does this; profile, process count and precision come from params.yaml)::

    accelerate launch --config_file configs/cpu-2proc.yaml --num_processes 2 --mixed_precision no -m tasks.ppo

Each iteration reads top to bottom: 1. sample prompts, 2. generate, 3. truncate after EOS, 4. score and evaluate the
old policy/reference/values, 5. rewards, 6. advantages, 7. K epochs of minibatch updates, 8. KL controller,
9. metrics. The math lives in :mod:`rlhf.ppo` as small tested functions.

On N processes (README "Scaling PPO"):

- the global batch of prompts is drawn from a stream shared by all ranks and rank r takes its episodes r, r+N, …
  (disjoint, none duplicated), so the prompts of an iteration do not depend on N;
- sampling seeds differ per rank (seed·1000 + rank); with ``sampling_seeds: per_episode`` each (episode, token)
  gets its own uniform from a stream shared by all ranks, so the sampled episodes do not depend on N either;
- whitening statistics are all-reduced; afterwards the small experience tensors are gathered, so the KL
  controller's KL and the logged rollout metrics are those of the global batch;
- the optimisation runs on global minibatches: one shuffle shared by all ranks cuts the global batch, each rank
  takes its share (as torch's DistributedSampler does), and every micro-batch loss is weighted so the gradient is
  the mean over all valid tokens of the global minibatch, whatever N and the accumulation steps;
- gradients are all-reduced once per optimiser step (``accelerator.accumulate`` skips the sync on the other
  micro-batches); only the main process logs (and, in ``tasks/ppo.py``, writes).

Reliability (:class:`ResumeCheckpoints`, :func:`check_rollout`, :func:`check_update`): every ``ppo.resume_every``
iterations the trainable weights, AdamW state, KL coefficient, iteration, metric history and every process's RNG
streams go to ``.rlhf/checkpoints/ppo``; a rerun resumes there and continues bitwise as the uninterrupted run would
(CPU, one process, same thread count). A non-finite score, log-prob, value, advantage, loss or weight stops training
with :class:`~rlhf.guards.NonFiniteError` before that iteration is logged or saved, so the last good checkpoint stays.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from rlhf import lean_gpt2, ppo
from rlhf.checkpoint import CheckpointError, checkpoint_folder, clear, fingerprint, load_latest, load_rank_rng, save_checkpoint, save_rank_rng
from rlhf.config import ConfigError, PPOConfig
from rlhf.guards import NonFiniteError, first_non_finite
from rlhf.modeling import (
    RewardNormalization,
    add_lora,
    enable_gradient_checkpointing,
    encode_prompts,
    load_policy,
    load_scalar_model,
    load_tokenizer,
    merge_lora,
    position_ids_from_mask,
    value_head_for,
)
from rlhf.rollout import Experience, generate_responses, pad_responses, response_logprobs, response_values, reward_scores

# ----------------------------------------------------------------------------------------------------------------
# Models


class PolicyAndCritic(nn.Module):
    """Policy and a separate critic trained together: one module so one DDP wrapper syncs both in one backward."""

    def __init__(self, policy: PreTrainedModel, critic: PreTrainedModel):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.lean = lean_gpt2.supports(policy) and lean_gpt2.supports(critic)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, s) ids → policy logits (b, s', vocab) and critic values (b, s'): every position (s' = s), or with
        ``response_start`` = q only the positions q−1 … s−2 that predict the response tokens (s' = s − q)."""
        keep = slice(None) if response_start is None else slice(response_start - 1, -1)
        if self.lean:
            return self.policy_logits(input_ids, attention_mask, response_start), self.critic_values(input_ids, attention_mask, response_start)
        position_ids = position_ids_from_mask(attention_mask)
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
        hidden = self.critic.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
        return logits[:, keep], self.critic.score(hidden[:, keep]).squeeze(-1)

    def policy_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int | None = None) -> torch.Tensor:
        """Lean path only: the policy half of :meth:`forward` (the LM head only where it is read)."""
        keep = slice(None) if response_start is None else slice(response_start - 1, -1)
        return lean_gpt2.lm_logits(self.policy, lean_gpt2.full_forward(self.policy, input_ids, attention_mask)[:, keep])

    def critic_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int | None = None) -> torch.Tensor:
        """Lean path only: the critic half of :meth:`forward`."""
        keep = slice(None) if response_start is None else slice(response_start - 1, -1)
        return self.critic.score(lean_gpt2.full_forward(self.critic, input_ids, attention_mask)[:, keep]).squeeze(-1)


class PolicyWithValueHead(nn.Module):
    """Policy whose last hidden state also feeds a linear value head: one trunk, one forward for logits and values.

    The shared-trunk design of TRL's ``AutoModelForCausalLMWithValueHead``; the value loss (× vf_coef) then also
    shapes the policy's features.
    """

    def __init__(self, policy: nn.Module, value_head: nn.Linear):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.lean = lean_gpt2.supports(policy)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, s) ids → policy logits (b, s', vocab) and values (b, s'); ``response_start`` as in PolicyAndCritic."""
        keep = slice(None) if response_start is None else slice(response_start - 1, -1)
        if self.lean:
            hidden = lean_gpt2.full_forward(self.policy, input_ids, attention_mask)[:, keep]
            return lean_gpt2.lm_logits(self.policy, hidden), self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        output = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            output_hidden_states=True,
        )
        hidden = output.hidden_states[-1][:, keep]  # after the final layer norm, the input of the LM head
        return output.logits[:, keep], self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)


@dataclass
class PPOModels:
    policy: nn.Module  # trained; initialised from SFT (a peft model when LoRA is on)
    reference: PreTrainedModel | None  # frozen SFT copy for the KL penalty; None with LoRA (= policy, adapter disabled)
    critic: PreTrainedModel | None  # separate critic, trained; initialised from the RM (or a zero head); None with a value head
    reward_model: PreTrainedModel  # frozen
    reward_normalization: RewardNormalization
    tokenizer: PreTrainedTokenizerBase
    value_head: nn.Linear | None = None  # value head on the policy trunk (value_model="head"), else None


def trainable_module(models: PPOModels) -> nn.Module:
    """The one module the optimiser trains: policy + critic, or policy + value head."""
    if models.value_head is not None:
        return PolicyWithValueHead(models.policy, models.value_head)
    return PolicyAndCritic(models.policy, models.critic)


def load_ppo_models(config: PPOConfig, sft_path: str | Path, reward_path: str | Path) -> PPOModels:
    """Policy, reference, value model and reward model as the memory options in ``config`` ask."""
    tokenizer = load_tokenizer(sft_path)
    reward_model = load_scalar_model(reward_path, tokenizer.pad_token_id).requires_grad_(False)
    policy = load_policy(sft_path)
    reference = None if config.lora_rank else load_policy(sft_path).requires_grad_(False)
    critic = value_head = None
    if config.value_model == "critic":
        critic = load_scalar_model(reward_path, tokenizer.pad_token_id)
        if config.value_init == "zero":
            torch.nn.init.zeros_(critic.score.weight)
    else:
        value_head = value_head_for(policy, reward_model if config.value_init == "reward" else None)
    if config.gradient_checkpointing:
        for model in (policy, critic):
            if model is not None:
                enable_gradient_checkpointing(model)
    if config.lora_rank:
        policy = add_lora(policy, config.lora_rank, config.lora_alpha, config.lora_target_modules)
    return PPOModels(policy, reference, critic, reward_model, RewardNormalization.load(reward_path), tokenizer, value_head)


# ----------------------------------------------------------------------------------------------------------------
# Processes


def launch_profile_uses_cpu(config_file: str | Path) -> bool:
    """Whether the accelerate launch profile asks for the CPU (``use_cpu: true``)."""
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(f"params.yaml: ppo.config_file {str(path)!r} not found")
    return bool((yaml.safe_load(path.read_text()) or {}).get("use_cpu", False))


def make_accelerator(config: PPOConfig) -> Accelerator:
    """The Accelerator of a launched PPO process; refuses a world size other than ``ppo.num_processes``.

    ``cpu=True`` when the profile says ``use_cpu`` or there is no GPU: torchrun (what `accelerate launch` uses for
    several processes) does not pass the CPU choice on, and without it every process silently runs alone with
    world size 1 (measured; DESIGN §3). The precision comes from params, so the launch flag cannot contradict it.
    """
    cpu = launch_profile_uses_cpu(config.config_file) or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps)
    if accelerator.num_processes != config.num_processes:
        raise ConfigError(
            f"params.yaml: ppo.num_processes is {config.num_processes} but this process runs in a world of "
            f"{accelerator.num_processes} ({accelerator.distributed_type}); check ppo.config_file {config.config_file!r}"
        )
    return accelerator


def shard_for_rank(items: list, rank: int, world_size: int) -> list:
    """Every process gets a disjoint, equal-sized slice (the tail that does not divide evenly is dropped).

    Rank r holds items r, r+N, r+2N, …: item g is row g // N of rank g % N (see :func:`global_episode_order`).
    """
    usable = len(items) - len(items) % world_size
    return items[rank:usable:world_size]


def global_episode_order(local_batch_size: int, world_size: int) -> torch.Tensor:
    """(N·b,) position in the rank-ordered gather of each global episode g = rank + N·row (shard_for_rank)."""
    episode = torch.arange(local_batch_size * world_size)
    return (episode % world_size) * local_batch_size + episode // world_size


def gather_experience(experience: Experience, accelerator: Accelerator, pad_token_id: int) -> Experience:
    """Every process gets the whole rollout batch, in global episode order.

    Only ids, masks and per-token statistics travel (no logits): (N·b) × (q + 8t) numbers. Queries are left-padded
    to each process's longest prompt and responses cut to each process's longest response, so both are first padded
    (queries on the left, responses on the right) to the longest over all processes.
    """
    if accelerator.num_processes == 1:
        return experience
    gathered: dict[str, torch.Tensor | None] = {}
    for name, value in vars(experience).items():
        if value is None:
            gathered[name] = None
            continue
        is_bool = value.dtype == torch.bool
        tensor = value.to(torch.uint8) if is_bool else value
        if name in Experience.QUERY_FIELDS:
            tensor = accelerator.pad_across_processes(tensor, dim=1, pad_index=pad_token_id if name == "query_ids" else 0, pad_first=True)
        elif name in Experience.RESPONSE_FIELDS:
            tensor = accelerator.pad_across_processes(tensor, dim=1, pad_index=pad_token_id if name == "responses" else 0)
        tensor = accelerator.gather(tensor.contiguous())
        gathered[name] = tensor.bool() if is_bool else tensor
    order = global_episode_order(experience.query_ids.shape[0], accelerator.num_processes)
    return Experience(**gathered).select(order.to(experience.query_ids.device))


def reduce_means(values: dict[str, torch.Tensor], accelerator: Accelerator) -> dict[str, float]:
    """Means over processes of per-process scalars, in one collective."""
    if accelerator.num_processes == 1:
        return {name: float(value) for name, value in values.items()}
    names = list(values)
    local = torch.stack([values[name].detach().float().reshape(()) for name in names]).to(accelerator.device)
    means = accelerator.reduce(local, reduction="mean").tolist()
    return dict(zip(names, means))


def token_weight(micro_tokens: int, minibatch_tokens: int, world_size: int, accumulation_steps: int) -> float:
    """Factor on a micro-batch's token-mean loss so that the summed gradient is the mean over all valid tokens of
    the global minibatch.

    accelerate divides each micro-batch loss by the accumulation steps G and DDP averages over the N processes, so
    weight = N·G·n_micro / n_minibatch. Without it every micro-batch mean counts equally however many tokens it
    holds (the gradient-accumulation normalisation bug: https://huggingface.co/blog/gradient_accumulation).
    With one process and no accumulation the weight is exactly 1.
    """
    return world_size * accumulation_steps * micro_tokens / max(minibatch_tokens, 1)


@contextlib.contextmanager
def full_parameters(accelerator: Accelerator, module: nn.Module) -> Iterator[None]:
    """Whole weights on every process while generating: FSDP shards them (DDP and DeepSpeed ZeRO-2 keep copies).

    TRL's ``unwrap_model_for_generation`` does the same for ZeRO-3; here FSDP1's ``summon_full_params`` or, for
    FSDP2, ``unshard()`` of every sharded module.
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        yield
        return
    if getattr(accelerator, "is_fsdp2", False):
        from torch.distributed.fsdp import FSDPModule

        sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
        reshard_after_forward = getattr(accelerator.state.fsdp_plugin, "reshard_after_forward", True)
        for m in sharded:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)  # keep them whole across the decoding steps
        try:
            yield
        finally:
            for m in sharded:
                m.set_reshard_after_forward(bool(reshard_after_forward), recurse=False)
                m.reshard()
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(module, writeback=False, recurse=True):
            yield


def export_policy(accelerator: Accelerator, module: nn.Module) -> PreTrainedModel | None:
    """The trained policy as a plain causal LM (LoRA merged, value model dropped) on the main process, else None.

    Call it on every process: under FSDP gathering the full weights is a collective.
    """
    if accelerator.distributed_type == DistributedType.FSDP:
        state = accelerator.get_state_dict(module)  # full weights on the main process
        if not accelerator.is_main_process:
            return None
        sharded_policy = accelerator.unwrap_model(module).policy
        base = sharded_policy.get_base_model() if hasattr(sharded_policy, "get_base_model") else sharded_policy
        policy = AutoModelForCausalLM.from_config(base.config)
        if hasattr(sharded_policy, "peft_config"):
            from peft import get_peft_model

            policy = get_peft_model(policy, sharded_policy.peft_config["default"])
        policy_state = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
        _, unexpected = policy.load_state_dict(policy_state, strict=False)
        if unexpected:
            raise RuntimeError(f"unexpected keys in the gathered policy state: {unexpected[:5]}")
    else:
        if not accelerator.is_main_process:
            return None
        policy = accelerator.unwrap_model(module).policy
    return merge_lora(policy)


# ----------------------------------------------------------------------------------------------------------------
# Rollout


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(n, start + size)) for start in range(0, n, size)]


def inverse_cdf_sample(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float) -> torch.Tensor:
    """(b, vocab) logits, (b,) uniforms in [0, 1) → (b,) tokens drawn from softmax(logits / T) by inverse transform.

    The token is the first whose cumulative probability exceeds u. Given the same u an episode samples the same
    token whatever batch it is in ("common random numbers"); tokens with probability 0 are never chosen.
    """
    cdf = torch.softmax(logits.float() / temperature, dim=-1).cumsum(-1)
    threshold = uniforms.to(cdf) * cdf[:, -1]  # the total is 1 up to rounding: scale u so it always lands in a bin
    tokens = torch.searchsorted(cdf, threshold.unsqueeze(-1), right=True).squeeze(-1)
    return tokens.clamp(max=logits.shape[-1] - 1)


class InverseCDFSampler(LogitsProcessor):
    """Turns greedy decoding into sampling with per-episode uniforms: the chosen token keeps score 0, all others −inf.

    Runs after generate()'s own processors (e.g. min_new_tokens), so it samples from the distribution they leave.
    """

    def __init__(self, uniforms: torch.Tensor, temperature: float, query_length: int):
        self.uniforms = uniforms  # (b, t): one uniform per episode and response position
        self.temperature = temperature
        self.query_length = query_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.query_length
        tokens = inverse_cdf_sample(scores, self.uniforms[:, step], self.temperature)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter(1, tokens.unsqueeze(-1), 0.0)


@torch.no_grad()
def generate_with_uniforms(
    policy: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
) -> torch.Tensor:
    """(b, t) responses sampled with the KV cache from softmax(logits / T), token i of episode e decided by
    ``uniforms[e, i]``; as :func:`rlhf.rollout.generate_responses`, rows are padded after their EOS."""
    max_new_tokens = uniforms.shape[1]
    output = policy.generate(
        input_ids=query_ids,
        attention_mask=query_mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=1,
        do_sample=False,
        temperature=None,
        top_k=None,
        top_p=None,
        logits_processor=LogitsProcessorList([InverseCDFSampler(uniforms, temperature, query_ids.shape[1])]),
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
    )
    return pad_responses(output[:, query_ids.shape[1] :], max_new_tokens, pad_token_id)


def policy_logprobs_and_values(
    trainable: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, t) log-probs of the response tokens (logits / temperature) and (b, t) values V(s_i) before each token."""
    input_ids = torch.cat([query_ids, responses], dim=1)
    attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)
    # the logit at position i predicts token i+1: response tokens are predicted from q−1 … q+t−2
    logits, values = trainable(input_ids, attention_mask, response_start=query_ids.shape[1])
    return ppo.logprobs_from_logits(logits, responses, temperature), values


def reference_logprobs(
    models: PPOModels, policy: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """(b, t) log-probs under the frozen SFT reference: its own copy, or with LoRA the policy with the adapter off."""
    args = (query_ids, query_mask, responses, response_mask, temperature)
    if models.reference is not None:
        return response_logprobs(models.reference, *args)[0]
    with policy.disable_adapter():  # peft: the frozen base weights are the SFT policy (TRL's PPO does the same)
        return response_logprobs(policy, *args)[0]


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

    ``trainable``: the unwrapped :func:`trainable_module`; ``uniforms`` (b, t): per-episode sampling (see
    :func:`inverse_cdf_sample`), None to sample from the global RNG. On the lean GPT-2 path the sampler's own
    log-probs are the old log-probs (``rollout_logprobs: sampler``) and a value head reads the sampler's hidden
    states, so the policy is not run again; the batch is cut to its longest response.
    """
    tokenizer = models.tokenizer
    query_ids, query_mask = (t.to(device) for t in encode_prompts(tokenizer, prompts))
    special = (tokenizer.eos_token_id, tokenizer.pad_token_id)
    value_head = getattr(trainable, "value_head", None)
    sampled_logprobs = sampled_values = None
    # 2. generate with the KV cache
    if getattr(trainable, "lean", False):
        sample = lean_gpt2.sample(trainable.policy, query_ids, query_mask, config.response_length, config.temperature, *special,
                                  uniforms=None if uniforms is None else uniforms.to(device), keep_hidden=value_head is not None)
        raw_responses = sample.responses
        if config.rollout_logprobs == "sampler":
            sampled_logprobs = sample.logprobs
            if value_head is not None:
                sampled_values = value_head(sample.hidden.to(value_head.weight.dtype)).squeeze(-1)
    elif uniforms is None:
        raw_responses = generate_responses(trainable.policy, query_ids, query_mask, config.response_length, config.temperature, *special)
    else:
        raw_responses = generate_with_uniforms(trainable.policy, query_ids, query_mask, uniforms.to(device), config.temperature, *special)
    # 3. EOS trick: everything after the first EOS is padding and masked; columns past the longest response dropped
    responses, response_mask, contains_eos = ppo.truncate_after_stop_token(raw_responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
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
            values = sampled_values[rows, :columns] if sampled_values is not None else response_values(trainable.critic, *args)
        parts["logprobs"].append(logprobs)
        parts["values"].append(values)
        parts["ref_logprobs"].append(reference_logprobs(models, trainable.policy, *args, config.temperature))
        parts["scores"].append(reward_scores(models.reward_model, models.reward_normalization, *args))
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


# ----------------------------------------------------------------------------------------------------------------
# Optimisation


def model_inputs(batch: Experience) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, q + t) ids and attention mask of query and response."""
    return torch.cat([batch.query_ids, batch.responses], dim=1), torch.cat([batch.query_mask, batch.response_mask.long()], dim=1)


def policy_side_loss(response_logits: torch.Tensor, batch: Experience, config: PPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(b, t, vocab) logits → clipped surrogate − c2 · entropy (the terms whose gradient reaches the policy)."""
    logprobs = ppo.logprobs_from_logits(response_logits, batch.responses, config.temperature)
    # without an entropy bonus the entropy is only reported: keep it out of the graph (no backward through it)
    entropy = ppo.entropy_from_logits(response_logits if config.ent_coef else response_logits.detach(), config.temperature)
    pg_loss, pg_stats = ppo.policy_loss(logprobs, batch.logprobs, batch.advantages, batch.response_mask, config.clip_range)
    mean_entropy = ppo.masked_mean(entropy, batch.response_mask)
    stats = {"ppo/loss/policy": pg_loss.detach(), "ppo/policy/entropy": mean_entropy.detach(),
             "ppo/policy/approxkl": pg_stats["approxkl"], "ppo/policy/clipfrac": pg_stats["clipfrac"]}
    return pg_loss - config.ent_coef * mean_entropy, stats


def value_side_loss(new_values: torch.Tensor, batch: Experience, config: PPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(b, t) values → c1 · clipped value loss (the term whose gradient reaches the critic or value head)."""
    vf_loss, vf_stats = ppo.value_loss(new_values, batch.values, batch.returns, batch.response_mask, config.clip_range_value)
    stats = {"ppo/loss/value": vf_loss.detach(), "ppo/val/clipfrac": vf_stats["clipfrac"], "ppo/val/vpred": vf_stats["mean_value"]}
    return config.vf_coef * vf_loss, stats


def ppo_minibatch_loss(
    trainable: nn.Module, batch: Experience, config: PPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step 7 for one micro-batch: clipped surrogate + c1 · clipped value loss − c2 · entropy."""
    input_ids, attention_mask = model_inputs(batch)
    response_logits, new_values = trainable(input_ids, attention_mask, response_start=batch.query_ids.shape[1])
    policy_loss, policy_stats = policy_side_loss(response_logits, batch, config)
    value_loss, value_stats = value_side_loss(new_values, batch, config)
    loss = policy_loss + value_loss
    return loss, {**policy_stats, **value_stats, "ppo/loss/total": loss.detach()}


def separate_backward_applies(module: nn.Module, accelerator: Accelerator) -> bool:
    """Whether :func:`policy_then_critic_backward` may replace the joint forward/backward of the unwrapped ``module``:
    one process (no DDP hooks to bypass) and a lean policy + critic."""
    return accelerator.distributed_type == DistributedType.NO and isinstance(module, PolicyAndCritic) and module.lean


def policy_then_critic_backward(
    module: PolicyAndCritic, batch: Experience, config: PPOConfig, weight: float, accelerator: Accelerator, bf16_weights: "Bf16Weights | None"
) -> dict[str, torch.Tensor]:
    """Step 7 for one micro-batch on one process: the policy's forward and backward, then the critic's.

    The loss is a sum of a policy term and a critic term over disjoint parameters, so the gradients equal those of
    :func:`ppo_minibatch_loss`'s one backward; but the policy's activations (and under bf16 its bf16 weight copies)
    are freed before the critic's forward, which lowers the peak memory of a step by about one model's share
    (19 M bench model, bf16: see README "Performance"). Returns the same statistics.
    """
    input_ids, attention_mask = model_inputs(batch)
    start = batch.query_ids.shape[1]
    losses, stats = [], {}
    for part, forward, side_loss in ((module.policy, module.policy_logits, policy_side_loss), (module.critic, module.critic_values, value_side_loss)):
        if bf16_weights is not None:
            bf16_weights.compute(part)
        with accelerator.autocast():
            output = forward(input_ids, attention_mask, start)
        loss, part_stats = side_loss(output.float(), batch, config)  # fp32 loss, as accelerate returns the joint forward's outputs
        accelerator.backward(loss * weight)
        if bf16_weights is not None:
            bf16_weights.master(part)
        losses.append(loss.detach())
        stats.update(part_stats)
    stats["ppo/loss/total"] = losses[0] + losses[1]
    return stats


class Bf16Weights:
    """bf16 copies of the trained weights for the PPO epochs' forwards and backwards; the fp32 tensors stay the
    optimiser's master weights (mixed precision with an fp32 master copy, Micikevicius et al. 2018; bf16 needs no
    loss scaling). Swaps ``parameter.data``, so the optimiser, its state and every caller see the same fp32
    parameters outside :meth:`compute` / :meth:`master` and the module is fp32 again after :meth:`close`.

    Against autocast over fp32 weights it copies as much per step (weights fp32 → bf16 once, gradients bf16 → fp32
    once, a chunk at a time in :meth:`step`) but keeps activations in bf16 end to end (no per-op casts) and never
    holds all gradients in fp32: on the 19 M bench model peak RSS went from 1236 to 1185 MiB at the same speed
    (within the run-to-run noise of ±10 %; bench/ppo_vs_trl.py), and to 1126 MiB with :func:`policy_then_critic_backward`
    casting one model at a time (``part``). One process and one micro-batch per step only: DDP's buckets keep the
    dtype they were built with, and accumulating gradients in bf16 would lose precision.
    """

    def __init__(self, module: nn.Module):
        self.parameters = [p for p in module.parameters()]
        self.masters: dict[int, torch.Tensor] = {}  # id(parameter) → its fp32 tensor while .data holds the bf16 copy

    @staticmethod
    def applies(module: nn.Module, config: PPOConfig, accelerator: Accelerator) -> bool:
        return (accelerator.mixed_precision == "bf16" and accelerator.distributed_type == DistributedType.NO
                and config.gradient_accumulation_steps == 1 and all(p.requires_grad for p in module.parameters()))

    def compute(self, part: nn.Module | None = None) -> None:
        """Before a forward: the parameters (of ``part``, default all) hold bf16 casts of the masters (which are kept)."""
        for parameter in self.parameters if part is None else part.parameters():
            master = self.masters.setdefault(id(parameter), parameter.data)
            parameter.data = master.to(torch.bfloat16)

    def master(self, part: nn.Module | None = None) -> None:
        """After the backward: the parameters (of ``part``, default all) hold the fp32 masters again (their gradients
        stay bf16 until :meth:`step`)."""
        for parameter in self.parameters if part is None else part.parameters():
            if id(parameter) in self.masters:
                parameter.data = self.masters.pop(id(parameter))

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float, chunk_bytes: int = 16 << 20) -> torch.Tensor:
        """Clip by the global gradient norm (accumulated in fp32) and step, casting the bf16 gradients to fp32 a
        chunk of parameters at a time so that never more than ``chunk_bytes`` of fp32 gradients exist (AdamW's
        fused kernel needs gradients in the parameters' dtype). Parameters without a gradient are skipped by the
        optimiser, so stepping chunk by chunk gives the same numbers as one step. Returns the norm before clipping.
        """
        pending = [(p, p.grad) for p in self.parameters if p.grad is not None]
        for parameter, _ in pending:
            parameter.grad = None
        norms = [torch.linalg.vector_norm(grad, dtype=torch.float32) for _, grad in pending]
        total_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        scale = (max_grad_norm / (total_norm + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
        while pending:
            chunk, size = [], 0
            while pending and (not chunk or size + pending[0][0].numel() * 4 <= chunk_bytes):
                parameter, grad = pending.pop(0)
                parameter.grad = grad.float().mul_(scale)
                chunk.append(parameter)
                size += parameter.numel() * 4
            optimizer.step()
            for parameter in chunk:
                parameter.grad = None
        return total_norm

    def close(self) -> None:
        self.master()


@dataclass
class PreparedTraining:
    module: nn.Module  # trainable_module(models) wrapped by accelerate (DDP, FSDP, DeepSpeed … or as is)
    optimizer: torch.optim.Optimizer  # AdamW over the trainable parameters (LoRA: adapters + value model only)
    bf16_weights: Bf16Weights | None = None  # single-process bf16: see Bf16Weights


def prepare_training(models: PPOModels, config: PPOConfig, accelerator: Accelerator) -> PreparedTraining:
    """Wrap the trainable module and its optimiser for the launch profile; place (and under bf16, cast) frozen models."""
    trainable = trainable_module(models)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        trainable.lean = False  # FSDP gathers weights in per-block hooks that the lean forward would bypass
    parameters = [p for p in trainable.parameters() if p.requires_grad]
    # One fused kernel for the whole AdamW update instead of ~10 small ops per tensor (torch ≥ 2.4 on CPU and CUDA)
    fused = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, eps=1e-5, fused=fused or None)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # No dataloader to infer the micro-batch from (TRL's PPO sets it the same way); DeepSpeed clips gradients itself.
        deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
        deepspeed_config["train_micro_batch_size_per_gpu"] = config.derived(accelerator.num_processes)["micro_batch_size"]
        deepspeed_config["gradient_clipping"] = config.max_grad_norm
    module, optimizer = accelerator.prepare(trainable, optimizer)
    if accelerator.distributed_type == DistributedType.FSDP:
        # FSDP initialises lazily from the first forward of the root; generation enters through a submodule
        # (policy.generate), which would make each block its own root. One tiny root forward settles it.
        with torch.no_grad():
            token = torch.ones((1, 1), dtype=torch.long, device=accelerator.device)
            module(token, torch.ones_like(token))
    for frozen in (models.reference, models.reward_model):
        if frozen is not None:
            frozen.to(accelerator.device).eval()
            if accelerator.mixed_precision == "bf16":
                frozen.to(torch.bfloat16)  # no gradients, no optimiser state: fp32 master weights buy nothing
    bf16_weights = Bf16Weights(trainable) if Bf16Weights.applies(trainable, config, accelerator) else None
    return PreparedTraining(module, optimizer, bf16_weights)


def optimise(
    prepared: PreparedTraining, batch: Experience, config: PPOConfig, accelerator: Accelerator, shuffle_generator: torch.Generator
) -> dict[str, list[torch.Tensor]]:
    """Step 7: K epochs over global minibatches of ``batch`` (the gathered rollout batch); returns per-micro-batch stats.

    One permutation shared by all ranks cuts the global batch into minibatches, as torch's DistributedSampler
    does; rank r runs episodes r, r+N, … of each as G micro-batches, and the gradient is all-reduced on the last.
    """
    world_size, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    accumulation = config.gradient_accumulation_steps
    minibatch_size = config.rollout_batch_size // config.num_minibatches
    micro_size = minibatch_size // world_size // accumulation
    trainable, optimizer, bf16_weights = prepared.module, prepared.optimizer, prepared.bf16_weights
    valid_tokens = batch.response_mask.sum(1).cpu()
    unwrapped = accelerator.unwrap_model(trainable)
    separate = separate_backward_applies(unwrapped, accelerator)
    step_stats: dict[str, list[torch.Tensor]] = {}
    for _ in range(config.ppo_epochs):
        order = torch.randperm(config.rollout_batch_size, generator=shuffle_generator)
        for minibatch in order.split(minibatch_size):
            minibatch_tokens = int(valid_tokens[minibatch].sum())
            for micro in shard_for_rank(minibatch, rank, world_size).split(micro_size):
                with accelerator.accumulate(trainable):
                    micro_batch = batch.select(micro.to(device)).trimmed()
                    weight = token_weight(int(valid_tokens[micro].sum()), minibatch_tokens, world_size, accumulation)
                    if separate:
                        stats = policy_then_critic_backward(unwrapped, micro_batch, config, weight, accelerator, bf16_weights)
                    else:
                        if bf16_weights is not None:
                            bf16_weights.compute()
                        loss, stats = ppo_minibatch_loss(trainable, micro_batch, config)
                        accelerator.backward(loss * weight)
                        if bf16_weights is not None:
                            bf16_weights.master()
                    if bf16_weights is not None:
                        bf16_weights.step(optimizer, config.max_grad_norm)
                    else:
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(trainable.parameters(), config.max_grad_norm)
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for name, value in stats.items():
                    step_stats.setdefault(name, []).append(value)
    if bf16_weights is not None:
        bf16_weights.close()
    return step_stats


def rollout_metrics(batch: Experience, kl_coef: float) -> dict[str, float]:
    """Step 9: metrics of the global rollout batch, with the field's usual names."""
    mask = batch.response_mask.float()
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
    }


# ----------------------------------------------------------------------------------------------------------------
# Resume checkpoints and divergence guards


def trainable_state(module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The trained tensors of the unwrapped :func:`trainable_module`, split into ``policy`` (all its weights, or only
    the LoRA adapters) and ``value`` (critic or value head). Frozen weights are not saved: they are the stage's inputs."""
    state: dict[str, dict[str, torch.Tensor]] = {"policy": {}, "value": {}}
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            state["policy" if name.startswith("policy.") else "value"][name] = parameter.detach()
    return state


def load_trainable_state(module: nn.Module, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Inverse of :func:`trainable_state`; the saved names must be exactly the module's trained parameters."""
    saved = {**state["policy"], **state["value"]}
    trained = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
    if set(saved) != trained:
        raise CheckpointError(f"the checkpoint's trained tensors do not match the model (e.g. {sorted(set(saved) ^ trained)[:3]})")
    _, unexpected = module.load_state_dict(saved, strict=False)
    if unexpected:
        raise CheckpointError(f"unexpected tensors in the checkpoint: {unexpected[:3]}")


def unsupported_resume(accelerator: Accelerator) -> str | None:
    """Why resume checkpoints cannot be taken in this launch, or None: FSDP and DeepSpeed shard the optimiser state
    (FSDP the weights too) over processes, which this main-process format does not gather."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return f"resume checkpoints are not supported under {accelerator.distributed_type.value} (sharded state); a rerun starts from iteration 0"
    return None


@dataclass
class ResumeCheckpoints:
    """PPO's crash-safe resume checkpoints (the layout of :mod:`rlhf.checkpoint`), shared by all processes.

    Per checkpoint after iteration N (every ``every`` iterations, never the last): every rank writes its RNG streams
    (global torch RNG, which sampling uses per rank; the loop's prompt/shuffle/uniform generators; python, NumPy)
    to ``step-N/rng-rank<r>.pt``; the main process writes ``state.pt``: the trained tensors (:func:`trainable_state`),
    the AdamW state, the learning-rate position, the KL coefficient, the metric history and ``extras()`` (the
    caller's bookkeeping). ``notify(event, fields)`` reports ``resumed`` {step}, ``checkpoint`` {step, seconds},
    ``checkpoint_discarded`` {reason} and ``checkpoint_unsupported`` {reason}; the stage forwards them as ``@rlhf``
    lines. Call :meth:`open` on every process before training, then pass this to :func:`train_ppo`.
    """

    folder: Path
    fingerprint: str
    every: int
    notify: Callable[[str, dict], None] = lambda event, fields: None
    extras: Callable[[], dict] = dict
    step: int = 0  # iteration of the checkpoint resumed from (0 = fresh start)
    last_step: int | None = None  # newest checkpoint on disk, if any
    state: dict | None = None  # loaded by open(), applied (and dropped) by train_ppo
    opened: bool = False

    @classmethod
    def for_stage(cls, stage: str, every: int, *parts, notify: Callable[[str, dict], None] = lambda event, fields: None) -> ResumeCheckpoints:
        """The checkpoints of ``stage`` in ``.rlhf/checkpoints/<stage>``, valid for ``parts`` (see :func:`rlhf.checkpoint.fingerprint`)."""
        return cls(checkpoint_folder(stage), fingerprint(*parts), every, notify)

    def open(self, accelerator: Accelerator, validate: Callable[[dict], str | None] = lambda extras: None) -> dict | None:
        """Every process: load the newest matching checkpoint; returns its ``extras`` (None: a fresh start).

        ``validate(extras)`` may veto a checkpoint (a reason string), e.g. when files it relies on are gone. All ranks
        must agree; on a fresh start the main process empties the folder (stale checkpoints and caller files).
        """
        self.opened = True
        found = None
        reason = unsupported_resume(accelerator)
        if reason:
            self.every = 0
            self.notify("checkpoint_unsupported", {"reason": reason})
        else:
            discarded = lambda why: self.notify("checkpoint_discarded", {"reason": why})  # noqa: E731
            found = load_latest(self.folder, self.fingerprint, discard=False, log=discarded)
            problem = validate(found[1].get("extras", {})) if found else None
            if problem:
                discarded(f"{self.folder}: discarding the checkpoint of step {found[0]}: {problem}; training starts from step 0")
                found = None
        step = found[0] if found else 0
        if accelerator.num_processes > 1:  # every rank read the same files: a disagreement is a bug, not a choice
            steps = accelerator.gather(torch.tensor([step], device=accelerator.device)).tolist()
            if len(set(steps)) != 1:
                raise CheckpointError(f"{self.folder}: the processes found different checkpoints {steps}")
        accelerator.wait_for_everyone()  # nobody reads the folder any more
        if found is None:
            if accelerator.is_main_process:
                clear(self.folder)
            accelerator.wait_for_everyone()
            return None
        self.step, self.state, self.last_step = found[0], found[1], found[0]
        self.notify("resumed", {"step": self.step})
        return found[1].get("extras", {})

    def due(self, iteration: int, total: int) -> bool:
        """Save after ``iteration`` completed iterations? Never after the last: the final outputs are written instead."""
        return self.every > 0 and iteration % self.every == 0 and 0 < iteration < total

    def save(self, iteration: int, accelerator: Accelerator, prepared: PreparedTraining, generators: dict[str, torch.Generator],
             kl_coef: float, history: list[dict]) -> None:
        """Every process (collective): the checkpoint after ``iteration``; see the class docstring for its content."""
        started = time.perf_counter()
        save_rank_rng(self.folder, iteration, accelerator.process_index, generators)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {
                **trainable_state(accelerator.unwrap_model(prepared.module)),
                "optimizer": prepared.optimizer.state_dict(),
                "scheduler": {"iteration": iteration, "lr": prepared.optimizer.param_groups[0]["lr"]},  # lr is a function of the iteration
                "kl_controller": {"value": float(kl_coef)},
                "iteration": iteration,
                "history": history,
                "extras": self.extras(),
            }
            save_checkpoint(self.folder, iteration, state, self.fingerprint, ranks=accelerator.num_processes)
        accelerator.wait_for_everyone()
        self.last_step = iteration
        self.notify("checkpoint", {"step": iteration, "seconds": round(time.perf_counter() - started, 4)})

    def restore(self, accelerator: Accelerator, prepared: PreparedTraining, kl_controller, generators: dict[str, torch.Generator]) -> list[dict]:
        """Every process, after :func:`prepare_training`: weights, optimiser state, KL coefficient and this rank's RNG
        streams as they were after iteration ``step``; returns the metric history of iterations 1 … ``step``."""
        state, self.state = self.state, None
        load_trainable_state(accelerator.unwrap_model(prepared.module), state)
        prepared.optimizer.load_state_dict(state["optimizer"])  # after prepare: the usual order (device placement)
        kl_controller.value = state["kl_controller"]["value"]
        load_rank_rng(self.folder, self.step, accelerator.process_index, generators)
        return list(state["history"])

    def clear(self, accelerator: Accelerator) -> None:
        """Main process: delete the checkpoints (call once the final outputs are written)."""
        if accelerator.is_main_process:
            clear(self.folder)
        self.last_step = None

    def kept(self) -> str:
        """A sentence for error messages: which checkpoint a rerun would resume from."""
        if self.last_step is None:
            return "no resume checkpoint was saved; a rerun starts from iteration 0"
        return f"the last good resume checkpoint (iteration {self.last_step}) is kept in {self.folder}; a rerun with the same params resumes from it"


class NonFiniteIteration(NonFiniteError):
    """NaN/inf in a PPO iteration: names the iteration, the quantity and whether the optimiser had stepped."""

    def __init__(self, iteration: int, quantity: str, value: float | str, hint: str, when: str) -> None:
        self.stage, self.step, self.quantity, self.value = "ppo", iteration, quantity, value
        RuntimeError.__init__(self, f"ppo: non-finite {quantity} ({value}) at iteration {iteration}, {when}; this iteration is neither "
                                    f"logged nor saved, final outputs not written. Hint: {hint}")


def divergence_hint(config: PPOConfig) -> str:
    return (f"lower ppo.learning_rate (now {config.learning_rate}) or ppo.max_grad_norm (now {config.max_grad_norm}) in params.yaml"
            + ("; or set ppo.mixed_precision: \"no\"" if config.mixed_precision != "no" else ""))


def check_rollout(batch: Experience, iteration: int, config: PPOConfig) -> None:
    """Before the optimiser steps: the global batch's scores, log-probs, values, rewards, advantages and returns are
    finite on the tokens that count (every process sees the same gathered batch, so all stop together)."""
    mask = batch.response_mask.bool()
    token = lambda tensor: tensor.masked_select(mask)  # noqa: E731 - padding may hold anything
    scores = first_non_finite(scores=batch.scores)
    if scores:
        hint = "the reward model (models/reward) scored a response NaN/inf: check models/reward/reward_normalization.json and rerun the reward stage"
        raise NonFiniteIteration(iteration, *scores, hint, "before the optimiser steps")
    found = first_non_finite(logprobs=token(batch.logprobs), ref_logprobs=token(batch.ref_logprobs), values=token(batch.values),
                             rewards=token(batch.rewards), advantages=token(batch.advantages), returns=token(batch.returns))
    if found:
        raise NonFiniteIteration(iteration, *found, divergence_hint(config) + " (the policy or value model diverged in an earlier iteration)",
                                 "before the optimiser steps")


def check_update(record: dict, module: nn.Module, iteration: int, config: PPOConfig, accelerator: Accelerator) -> None:
    """After the optimiser steps: the losses (means over processes) and every trained weight are finite.

    A NaN loss makes NaN gradients and weights at once; a finite loss with an overflowing gradient can too, hence the
    weight check (one pass over the trained tensors; a sum over processes so sharded weights stop every rank).
    """
    found = first_non_finite(**{name.removeprefix("ppo/loss/") + "_loss": record[name] for name in ("ppo/loss/total", "ppo/loss/policy", "ppo/loss/value")})
    if not found:
        trained = [p.detach() for p in module.parameters() if p.requires_grad]
        bad = torch.zeros((), device=accelerator.device)
        # fast path: a tensor holding NaN/inf has a non-finite sum (≈ 0.3 ms for the shipped 1.7 M trained weights on
        # one CPU thread, 10x less than isfinite per tensor); count exactly only then (a finite sum can overflow)
        if trained and not bool(torch.stack([p.sum() for p in trained]).isfinite().all()):
            bad = torch.stack([(~torch.isfinite(p)).sum() for p in trained]).sum().float()
        count = reduce_means({"count": bad}, accelerator)["count"] * accelerator.num_processes
        found = ("weights", f"{round(count)} values") if count else None
    if found:
        raise NonFiniteIteration(iteration, *found, divergence_hint(config), "after its optimiser steps (its update is discarded)")


def train_ppo(
    models: PPOModels,
    prompts: list[str],
    config: PPOConfig,
    seed: int,
    accelerator: Accelerator,
    log: Callable[[dict], None] = lambda record: None,
    prepared: PreparedTraining | None = None,
    on_iteration: Callable[[int, Accelerator, PreparedTraining], None] | None = None,
    resume: ResumeCheckpoints | None = None,
    after_iteration: Callable[[], object] = lambda: None,
) -> list[dict]:
    """Train the policy and value model in place; returns the per-iteration metric history (the same on every rank).

    ``prepared``: from :func:`prepare_training` when the caller needs the wrapped module afterwards (export).
    ``on_iteration(step, accelerator, prepared)``: called on every process after each iteration (step counts from 1),
    e.g. to save a checkpoint through :func:`export_policy` (a collective under FSDP).
    ``resume``: continue from its checkpoint (opened here unless the caller did) and save one every ``resume.every``
    iterations, after ``on_iteration``; the returned history then includes the iterations run before the resume.
    Raises :class:`~rlhf.guards.NonFiniteError` (:func:`check_rollout`, :func:`check_update`) on NaN/inf.
    """
    world_size, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    sizes = config.derived(world_size)
    if len(prompts) < config.rollout_batch_size:
        raise ValueError(f"{len(prompts)} prompts cannot fill ppo.rollout_batch_size={config.rollout_batch_size}")
    all_reduce_sum = (lambda t: accelerator.reduce(t, reduction="sum")) if world_size > 1 else None
    prepared = prepared or prepare_training(models, config, accelerator)
    trainable, optimizer = prepared.module, prepared.optimizer
    kl_controller = ppo.make_kl_controller(config.kl_coef, config.adaptive_kl, config.kl_target, config.kl_horizon)
    # generate() samples from the global RNG: seeds differ per rank (N implementation details, "seeds").
    torch.manual_seed(seed * 1000 + rank)
    # Streams shared by all ranks, so the global batch, the minibatch cuts and (per_episode) the sampling uniforms
    # do not depend on the number of processes.
    prompt_generator = torch.Generator().manual_seed(seed * 1000)
    shuffle_generator = torch.Generator().manual_seed(seed * 1000 + 1)
    uniform_generator = torch.Generator().manual_seed(2**32 + seed)  # apart from the per-rank seeds above
    generators = {"prompts": prompt_generator, "shuffle": shuffle_generator, "uniforms": uniform_generator}
    history: list[dict] = []
    if resume is not None and not resume.opened:
        resume.open(accelerator)
    if resume is not None and resume.state is not None:  # weights, AdamW, β, RNG streams as after iteration resume.step
        history = resume.restore(accelerator, prepared, kl_controller, generators)
    for iteration in range(len(history), config.iterations):
        timings: dict[str, float] = {}
        started = time.perf_counter()
        if config.anneal_lr:
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * (1.0 - iteration / config.iterations)
        # 1. the global batch of prompts (no prompt twice); this rank's episodes are r, r+N, …
        batch_index = torch.randperm(len(prompts), generator=prompt_generator)[: config.rollout_batch_size].tolist()
        local_prompts = shard_for_rank([prompts[i] for i in batch_index], rank, world_size)
        uniforms = None
        if config.sampling_seeds == "per_episode":
            uniforms = shard_for_rank(torch.rand(config.rollout_batch_size, config.response_length, generator=uniform_generator), rank, world_size)
        # 2–4. generate, truncate, score, evaluate old policy / reference / values
        with full_parameters(accelerator, trainable), accelerator.autocast():
            unwrapped = accelerator.unwrap_model(trainable)
            unwrapped.eval()
            experience = collect_experience(models, unwrapped, local_prompts, config, sizes["local_minibatch_size"], device, uniforms)
        timings["timing/rollout"] = time.perf_counter() - started
        # 5–6. rewards and advantages (whitening statistics are global across processes)
        kl_coef = kl_controller.value
        experience = add_advantages(experience, config, kl_coef, all_reduce_sum)
        batch = gather_experience(experience, accelerator, models.tokenizer.pad_token_id)
        check_rollout(batch, iteration + 1, config)
        # 7. K epochs over global minibatches, gradient accumulation over micro-batches
        optimise_started = time.perf_counter()
        trainable.train()
        step_stats = optimise(prepared, batch, config, accelerator, shuffle_generator)
        timings["timing/optimise"] = time.perf_counter() - optimise_started
        # 8. adaptive KL controller on the global batch's mean sequence KL
        record = {"step": iteration + 1, "total": config.iterations, "episodes": (iteration + 1) * config.rollout_batch_size}
        record.update(rollout_metrics(batch, kl_coef))
        record["rollout/query_length"] = batch.query_ids.shape[1]  # padded columns: what the forwards process
        record["rollout/response_columns"] = batch.responses.shape[1]
        record["rollout/generated_tokens"] = batch.responses.numel()  # sampled tokens, EOS-ended rows included
        kl_controller.update(record["objective/kl"], config.rollout_batch_size)
        # 9. metrics: optimisation statistics averaged over processes (one collective)
        record["lr"] = optimizer.param_groups[0]["lr"]
        record.update(reduce_means({name: torch.stack(values).mean() for name, values in step_stats.items()}, accelerator))
        check_update(record, trainable, iteration + 1, config, accelerator)
        after_iteration()  # e.g. hand freed heap back to the OS (tasks/stage_io.release_free_heap)
        timings["timing/iteration"] = time.perf_counter() - started
        record.update(timings)
        record["eps"] = config.rollout_batch_size / timings["timing/iteration"]
        history.append(record)
        if accelerator.is_main_process:
            log(record)
        if on_iteration is not None:
            on_iteration(iteration + 1, accelerator, prepared)
        if resume is not None and resume.due(iteration + 1, config.iterations):
            resume.save(iteration + 1, accelerator, prepared, generators, kl_controller.value, history)
    accelerator.wait_for_everyone()
    return history
