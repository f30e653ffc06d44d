"""What PPO needs to know about running on N processes under accelerate (docs/design.md §6).

- the global batch is split by :func:`shard_for_rank`: rank r holds episodes r, r+N, … (disjoint, equal-sized), and
  :func:`gather_experience` puts every rank's share back in global episode order, so the KL controller and the logged
  metrics see the global batch;
- each micro-batch loss is weighted by :func:`token_weight`, so the gradient is the mean over all valid tokens of the
  global minibatch whatever N and the accumulation steps;
- :func:`full_parameters` gives whole weights while generating under FSDP, :func:`export_policy` the trained policy
  on the main process, :func:`processes_of` the checkpoint manager's view of the ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from rlhf.checkpoint import Processes
from rlhf.config import ConfigError, PPOConfig
from rlhf.modeling import merge_lora
from rlhf.rollout import Experience


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
    world size 1 (measured; docs/design.md §8). The precision comes from params: the launch flag cannot contradict it.
    """
    cpu = launch_profile_uses_cpu(config.config_file) or not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps
    )
    if accelerator.num_processes != config.num_processes:
        raise ConfigError(
            f"params.yaml: ppo.num_processes is {config.num_processes} but this process runs in a world of "
            f"{accelerator.num_processes} ({accelerator.distributed_type}); "
            f"check ppo.config_file {config.config_file!r}"
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


def processes_of(accelerator: Accelerator) -> Processes:
    """This launch's processes as :class:`rlhf.checkpoint.ResumeCheckpoints` sees them (rank 0 is the main process)."""

    def gather(value: int) -> list[int]:
        return accelerator.gather(torch.tensor([value], device=accelerator.device)).tolist()

    return Processes(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone, gather)
