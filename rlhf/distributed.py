"""Running a stage on N processes under accelerate: the launch, the split of work, and what travels between ranks
(docs/design.md §6). Shared by every model stage (sft, reward, sample_pairs, evaluate, ppo).

- :func:`make_accelerator` builds the stage's Accelerator from its resolved launch (params.yaml ``launch``) and
  refuses a world of another size;
- work is split by :func:`shard_for_rank`: rank r holds items r, r+N, … (disjoint, equal-sized), and
  :func:`gather_in_order` puts every rank's results back in the global order;
- each micro-batch loss is weighted by :func:`token_weight`, so the gradient is the mean over all valid tokens (or
  rows) of the global batch whatever N and the accumulation steps;
- :func:`full_parameters` gives whole weights while generating under FSDP, :func:`processes_of` the checkpoint
  manager's view of the ranks.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from torch import nn

from rlhf import lean_gpt2
from rlhf.checkpoint import Processes
from rlhf.config import ConfigError, Launch


def read_profile(config_file: str | Path, key: str = "launch.config_file") -> dict:
    """An accelerate launch profile (YAML); ``key`` names the param in errors."""
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(f"params.yaml: {key} {str(path)!r} not found")
    return yaml.safe_load(path.read_text()) or {}


SHARDED_TYPES = ("FSDP", "DEEPSPEED")  # profiles whose sharding only exists on GPUs under accelerate


def make_accelerator(launch: Launch, stage: str, gradient_accumulation_steps: int = 1) -> Accelerator:
    """The Accelerator of a launched stage process; refuses a world size other than ``launch.num_processes``, and a
    sharded profile (FSDP, DeepSpeed) that this machine runs as something else.

    ``cpu=True`` when the profile says ``use_cpu`` or there is no GPU: torchrun (what `accelerate launch` uses for
    several processes) does not pass the CPU choice on, and without it every process silently runs alone with
    world size 1 (measured; docs/design.md §8). On the CPU accelerate then runs plain data parallel (MULTI_CPU)
    whatever the profile says, so an FSDP or DeepSpeed profile there is refused rather than silently not sharded.
    The precision comes from params: the launch flag cannot contradict it.
    """
    key = f"launch.config_file (or launch.{stage}.config_file)"
    profile = read_profile(launch.config_file, key)
    cpu = bool(profile.get("use_cpu", False)) or not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=launch.mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps
    )
    if accelerator.num_processes != launch.num_processes:
        raise ConfigError(
            f"params.yaml: {stage} runs with num_processes {launch.num_processes} (launch.num_processes or "
            f"launch.{stage}.num_processes) but this process runs in a world of {accelerator.num_processes} "
            f"({accelerator.distributed_type}); check its launch config_file {launch.config_file!r}"
        )
    if cpu and launch.mixed_precision == "bf16" and accelerator.is_main_process and not lean_gpt2.cpu_has_bf16_gemm():
        print(
            f"warning: {stage}: launch.mixed_precision bf16 on a CPU without bf16 GEMM kernels (no AVX-512, "
            "AVX512-BF16 or AMX): bf16 runs many times slower than fp32 here; set launch.mixed_precision: no",
            file=sys.stderr,
            flush=True,
        )
    asked = str(profile.get("distributed_type", ""))
    if asked in SHARDED_TYPES and accelerator.distributed_type.value != asked:
        raise ConfigError(
            f"params.yaml: {stage}'s launch profile {launch.config_file!r} asks for {asked} but this machine runs it "
            f"as {accelerator.distributed_type.value} ({'CPU' if cpu else 'no GPU'}): {asked} shards over GPUs; "
            "use configs/cpu-2proc.yaml (data parallel) on CPUs"
        )
    return accelerator


def shard_for_rank(items: list, rank: int, world_size: int) -> list:
    """Every process gets a disjoint, equal-sized slice (the tail that does not divide evenly is dropped).

    Rank r holds items r, r+N, r+2N, …: item g is row g // N of rank g % N
    (see :func:`rlhf.ppo_trainer.processes.global_episode_order`).
    """
    usable = len(items) - len(items) % world_size
    return items[rank:usable:world_size]


def shard_slice(n_items: int, rank: int, world_size: int) -> range:
    """Indices of rank's share of ``n_items`` when every item must be processed (no tail dropped): r, r+N, …"""
    return range(rank, n_items, world_size)


def gather_in_order(local: list, accelerator: Accelerator) -> list:
    """Every rank's results of :func:`shard_slice` back in global item order, on every process.

    Rank r's i-th result is item r + N·i; ranks hold ⌈n/N⌉ or ⌊n/N⌋ items (Python objects, pickled over the
    process group).
    """
    if accelerator.num_processes == 1:
        return list(local)
    per_rank = gather_object([local])  # one list per rank, in rank order
    n_items = sum(len(items) for items in per_rank)
    ordered: list = [None] * n_items
    for rank, items in enumerate(per_rank):
        ordered[rank :: accelerator.num_processes] = items
    return ordered


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


def processes_of(accelerator: Accelerator) -> Processes:
    """This launch's processes as :class:`rlhf.checkpoint.ResumeCheckpoints` sees them (rank 0 is the main process)."""

    def gather(value: int) -> list[int]:
        return accelerator.gather(torch.tensor([value], device=accelerator.device)).tolist()

    return Processes(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone, gather)


def unsupported_resume(accelerator: Accelerator) -> str | None:
    """Why resume checkpoints cannot be taken in this launch, or None: FSDP and DeepSpeed shard the optimiser state
    (FSDP the weights too) over processes, which this main-process format does not gather."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return (
            f"resume checkpoints are not supported under {accelerator.distributed_type.value} (sharded state); "
            "a rerun starts from the beginning"
        )
    return None


def launch_part(accelerator: Accelerator) -> dict[str, object]:
    """The launch as part of a resume checkpoint's fingerprint: a checkpoint of another world size, distributed type
    or precision would continue a different computation."""
    return {
        "num_processes": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "mixed_precision": accelerator.mixed_precision,
    }
