"""Step 7 of a PPO iteration: the trainable module and AdamW wrapped for the launch (:func:`prepare_training`), and K
epochs of minibatch updates on the gathered rollout batch (:func:`optimise`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from rlhf import ppo
from rlhf.config import PPOConfig
from rlhf.distributed import shard_for_rank
from rlhf.ppo_trainer.losses import micro_batch_weights, ppo_minibatch_loss
from rlhf.ppo_trainer.memory import Bf16Weights, policy_then_critic_backward, separate_backward_applies
from rlhf.ppo_trainer.models import PPOModels, trainable_module
from rlhf.rollout import Experience


@dataclass
class PreparedTraining:
    module: nn.Module  # trainable_module(models) wrapped by accelerate (DDP, FSDP, DeepSpeed … or as is)
    optimizer: torch.optim.Optimizer  # AdamW over the trainable parameters (LoRA: adapters + value model only)
    bf16_weights: Bf16Weights | None = None  # single-process bf16: see Bf16Weights


def prepare_training(models: PPOModels, config: PPOConfig, accelerator: Accelerator) -> PreparedTraining:
    """Wrap the trainable module and optimiser for the launch profile; place (and under bf16, cast) frozen models."""
    trainable = trainable_module(models)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        trainable.lean = False  # FSDP gathers weights in per-block hooks that the lean forward would bypass
    parameters = [p for p in trainable.parameters() if p.requires_grad]
    # One fused kernel for the whole AdamW update instead of ~10 small ops per tensor (torch ≥ 2.4 on CPU and CUDA)
    fused = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, eps=1e-5, fused=fused or None)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # No dataloader to infer the micro-batch from (TRL's PPO sets it the same way);
        # DeepSpeed clips gradients itself.
        deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
        deepspeed_config["train_micro_batch_size_per_gpu"] = config.derived(accelerator.num_processes)[
            "micro_batch_size"
        ]
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


def anneal_learning_rate(optimizer: torch.optim.Optimizer, config: PPOConfig, iteration: int) -> None:
    """With ``ppo.anneal_lr``: the learning rate decays linearly to 0 over the iterations
    (a function of the iteration)."""
    if config.anneal_lr:
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * (1.0 - iteration / config.iterations)


def optimise(
    prepared: PreparedTraining,
    batch: Experience,
    config: PPOConfig,
    accelerator: Accelerator,
    shuffle_generator: torch.Generator,
    kl_coef: float = 0.0,
    train_policy: bool = True,
) -> dict[str, list[torch.Tensor]]:
    """Step 7: K epochs over global minibatches of ``batch`` (gathered rollout batch); returns per-micro-batch stats.

    One permutation shared by all ranks cuts the global batch into minibatches, as torch's DistributedSampler
    does; rank r runs episodes r, r+N, … of each as G micro-batches, and the gradient is all-reduced on the last.
    Each micro-batch takes one of two equivalent backward paths: on one process with a lean policy + critic (the
    default single-process setup) :func:`~rlhf.ppo_trainer.memory.policy_then_critic_backward`, otherwise the joint
    backward of :func:`~rlhf.ppo_trainer.losses.ppo_minibatch_loss`; under single-process bf16 the optimiser steps
    through :class:`~rlhf.ppo_trainer.memory.Bf16Weights`. ``kl_coef``: β of the KL loss term (``kl_penalty:
    loss``). ``train_policy=False`` (critic warm-up): the policy's gradients are dropped before every step, so
    AdamW leaves its weights and moments untouched and only the value model learns.
    """
    world_size, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    minibatch_size = config.rollout_batch_size // config.num_minibatches
    micro_size = minibatch_size // world_size // config.gradient_accumulation_steps
    trainable, optimizer, bf16_weights = prepared.module, prepared.optimizer, prepared.bf16_weights
    trainable.train()
    unwrapped = accelerator.unwrap_model(trainable)
    separate = separate_backward_applies(unwrapped, accelerator)
    step_stats: dict[str, list[torch.Tensor]] = {}
    for _ in range(config.ppo_epochs):
        order = torch.randperm(config.rollout_batch_size, generator=shuffle_generator)
        for minibatch in order.split(minibatch_size):
            minibatch_mask = batch.response_mask[minibatch.to(device)]
            units = (ppo.loss_units(minibatch_mask, config.loss_aggregation), int(minibatch_mask.sum()))
            for micro in shard_for_rank(minibatch, rank, world_size).split(micro_size):
                with accelerator.accumulate(trainable):
                    micro_batch = batch.select(micro.to(device)).trimmed()
                    weights = micro_batch_weights(micro_batch, units, config, world_size)
                    if separate:
                        stats = policy_then_critic_backward(
                            unwrapped, micro_batch, config, weights, accelerator, bf16_weights, kl_coef
                        )
                    else:
                        if bf16_weights is not None:
                            bf16_weights.compute()
                        loss, stats = ppo_minibatch_loss(trainable, micro_batch, config, weights, kl_coef)
                        accelerator.backward(loss)
                        if bf16_weights is not None:
                            bf16_weights.master()
                    if not train_policy:
                        for parameter in unwrapped.policy.parameters():
                            parameter.grad = None  # after DDP's all-reduce: no gradient, no AdamW update
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
