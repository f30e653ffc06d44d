"""The PPO training loop (docs/design.md §4): :func:`train_ppo`, the same optimisation on any number of processes.

Launch (the `ppo` DVC stage does this; profile, process count and precision come from params.yaml)::

    accelerate launch --config_file configs/cpu-2proc.yaml --num_processes 2 --mixed_precision no -m tasks.ppo

On N processes (docs/design.md §6):

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

Reliability: every ``ppo.resume_every`` iterations a resume checkpoint is saved (:mod:`rlhf.ppo_trainer.resume`) and
a rerun continues from it bitwise; a non-finite score, log-prob, value, advantage, loss or weight stops training
(:mod:`rlhf.ppo_trainer.checks`) before that iteration is logged or saved, so the last good checkpoint stays.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from accelerate import Accelerator

from rlhf import ppo
from rlhf.checkpoint import ResumeCheckpoints
from rlhf.config import PPOConfig
from rlhf.distributed import reduce_means
from rlhf.ppo_trainer.checks import check_rollout, check_update
from rlhf.ppo_trainer.experience import (
    add_advantages,
    add_critic_free_advantages,
    iteration_prompts,
    roll_out,
    rollout_metrics,
    without_uniform_groups,
)
from rlhf.ppo_trainer.models import PPOModels
from rlhf.ppo_trainer.optimise import PreparedTraining, anneal_learning_rate, optimise, prepare_training
from rlhf.ppo_trainer.processes import gather_experience
from rlhf.ppo_trainer.resume import restore_training, save_training


def random_streams(seed: int, rank: int) -> dict[str, torch.Generator]:
    """Seeds this rank's global RNG, which sampling draws from (seed·1000 + rank: the seeds differ per rank, N
    implementation details, "seeds"), and returns the streams all ranks share, so that the global batch, the minibatch
    cuts and (per_episode) the sampling uniforms do not depend on the number of processes."""
    torch.manual_seed(seed * 1000 + rank)
    return {
        "prompts": torch.Generator().manual_seed(seed * 1000),
        "shuffle": torch.Generator().manual_seed(seed * 1000 + 1),
        "uniforms": torch.Generator().manual_seed(2**32 + seed),  # apart from the per-rank seeds above
    }


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

    ``prepared``: from :func:`~rlhf.ppo_trainer.optimise.prepare_training` when the caller needs the wrapped module
    afterwards (export). ``on_iteration(step, accelerator, prepared)``: called on every process after each iteration
    (step counts from 1), e.g. :class:`~rlhf.ppo_trainer.snapshots.PolicySnapshots` (a collective under FSDP).
    ``resume``: continue from its checkpoint (opened here unless the caller did) and save one every ``resume.every``
    iterations, after ``on_iteration``; the returned history then includes the iterations run before the resume.
    ``after_iteration()``: called on every process once an iteration's update passed its checks (e.g. hand freed heap
    back to the OS: tasks/stage_io.release_free_heap). Raises :class:`~rlhf.ppo_trainer.checks.NonFiniteIteration`
    on NaN/inf.
    """
    world_size, rank = accelerator.num_processes, accelerator.process_index
    config.derived(world_size)  # every per-process size divides exactly (a ConfigError before any work)
    if len(prompts) < config.rollout_batch_size // config.group_size:
        raise ValueError(
            f"{len(prompts)} prompts cannot fill ppo.rollout_batch_size={config.rollout_batch_size} "
            f"with ppo.group_size={config.group_size} samples per prompt"
        )
    all_reduce_sum = (lambda t: accelerator.reduce(t, reduction="sum")) if world_size > 1 else None
    prepared = prepared or prepare_training(models, config, accelerator)
    kl_controller = ppo.make_kl_controller(config.kl_coef, config.adaptive_kl, config.kl_target, config.kl_horizon)
    streams = random_streams(seed, rank)
    history = restore_training(resume, accelerator, prepared, kl_controller, streams) if resume is not None else []
    for iteration in range(len(history), config.iterations):
        timings: dict[str, float] = {}
        started = time.perf_counter()
        anneal_learning_rate(prepared.optimizer, config, iteration)
        # 1. prompts: the global batch, this rank's episodes r, r+N, … of it (and, per_episode, their uniforms)
        local_prompts, uniforms = iteration_prompts(prompts, config, streams, rank, world_size)
        # 2. generate, 3. truncate after EOS, 4. score: old log-probs, reference log-probs, values, RM scores
        experience = roll_out(
            models, prepared.module, local_prompts, uniforms, config, accelerator, prepared.bf16_weights
        )
        timings["timing/rollout"] = time.perf_counter() - started
        # 5. rewards and 6. advantages, then the global batch everywhere. PPO: GAE on this rank's episodes (whitening
        # statistics global across processes); critic-free: on the gathered batch, whose groups span processes
        kl_coef = kl_controller.value
        if config.critic_free:
            batch = gather_experience(experience, accelerator, models.tokenizer.pad_token_id)
            batch = add_critic_free_advantages(batch, config, kl_coef)
        else:
            experience = add_advantages(experience, config, kl_coef, all_reduce_sum)
            batch = gather_experience(experience, accelerator, models.tokenizer.pad_token_id)
        check_rollout(batch, iteration + 1, config)
        update_batch, filtered = batch, None
        if config.filter_uniform_groups:  # DAPO: groups whose samples all scored alike carry no signal
            update_batch, filtered = without_uniform_groups(batch, config.group_size)
        # 7. K epochs of minibatch updates (the policy frozen during critic warm-up). optimise() picks each
        # micro-batch's backward: on one process with a lean policy + critic (the default)
        # memory.policy_then_critic_backward, else losses.ppo_minibatch_loss's joint one
        optimise_started = time.perf_counter()
        train_policy = iteration >= config.critic_warmup_iterations
        step_stats = optimise(prepared, update_batch, config, accelerator, streams["shuffle"], kl_coef, train_policy)
        timings["timing/optimise"] = time.perf_counter() - optimise_started
        # 8. the adaptive KL controller, on the global batch's mean sequence KL
        record = {
            "step": iteration + 1,
            "total": config.iterations,
            "episodes": (iteration + 1) * config.rollout_batch_size,
        }
        record.update(rollout_metrics(batch, kl_coef, config.group_size))
        if filtered is not None:
            record["rollout/filtered_groups"] = filtered
        kl_controller.update(record["objective/kl"], config.rollout_batch_size)
        # 9. metrics: optimisation statistics averaged over processes (one collective), then the update's own checks
        record["lr"] = prepared.optimizer.param_groups[0]["lr"]
        record.update(
            reduce_means({name: torch.stack(values).mean() for name, values in step_stats.items()}, accelerator)
        )
        check_update(record, prepared.module, iteration + 1, config, accelerator)
        after_iteration()
        timings["timing/iteration"] = time.perf_counter() - started
        record.update(timings)
        record["eps"] = config.rollout_batch_size / timings["timing/iteration"]
        history.append(record)
        if accelerator.is_main_process:
            log(record)
        if on_iteration is not None:
            on_iteration(iteration + 1, accelerator, prepared)
        if resume is not None and resume.due(iteration + 1, config.iterations):
            save_training(resume, iteration + 1, accelerator, prepared, streams, kl_controller.value, history)
    accelerator.wait_for_everyone()
    return history
