"""What PPO adds to :mod:`rlhf.distributed` (docs/design.md §6): its Accelerator from the PPO config,
:func:`gather_experience` (every rank's share of the rollout back in global episode order, so the KL controller and
the logged metrics see the global batch) and :func:`export_policy` (the trained policy on the main process).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from rlhf.config import Launch, PPOConfig
from rlhf.distributed import make_accelerator as make_stage_accelerator
from rlhf.modeling import merge_lora
from rlhf.rollout import Experience


def make_accelerator(config: PPOConfig) -> Accelerator:
    """The Accelerator of a launched PPO process (:func:`rlhf.distributed.make_accelerator` with ppo's launch)."""
    launch = Launch(config.config_file, config.num_processes, config.mixed_precision)
    return make_stage_accelerator(launch, "ppo", config.gradient_accumulation_steps)


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
            tensor = accelerator.pad_across_processes(
                tensor, dim=1, pad_index=pad_token_id if name == "query_ids" else 0, pad_first=True
            )
        elif name in Experience.RESPONSE_FIELDS:
            tensor = accelerator.pad_across_processes(
                tensor, dim=1, pad_index=pad_token_id if name == "responses" else 0
            )
        tensor = accelerator.gather(tensor.contiguous())
        gathered[name] = tensor.bool() if is_bool else tensor
    order = global_episode_order(experience.query_ids.shape[0], accelerator.num_processes)
    return Experience(**gathered).select(order.to(experience.query_ids.device))


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
