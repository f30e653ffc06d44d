"""PPO's resume checkpoints on the shared manager :class:`rlhf.checkpoint.ResumeCheckpoints`: what one holds, and how
the loop saves and restores it (docs/design.md, crash safety).

A checkpoint after iteration N (every ``ppo.resume_every`` iterations, never the last) holds every rank's RNG streams
(the global torch RNG, which sampling uses per rank; the loop's prompt, shuffle and uniform generators; Python,
NumPy) in ``step-N/rng-rank<r>.pt``, and from the main process ``state.pt``: the trained tensors
(:func:`trainable_state`), the AdamW state, the learning-rate position, the KL coefficient, the metric history and the
caller's ``extras`` (the stage's policy snapshots). A resumed run continues bitwise as the uninterrupted run would
(CPU, one process, same thread count). FSDP and DeepSpeed launches do not checkpoint (:func:`unsupported_resume`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from rlhf.checkpoint import CheckpointError, ResumeCheckpoints, config_part
from rlhf.config import PPOConfig
from rlhf.distributed import processes_of, unsupported_resume
from rlhf.ppo import AdaptiveKLController, FixedKLController
from rlhf.ppo_trainer.optimise import PreparedTraining


def stage_checkpoints(
    config: PPOConfig,
    seed: int,
    accelerator: Accelerator,
    inputs: tuple[Path, ...],
    notify: Callable[[str, dict], None],
) -> ResumeCheckpoints:
    """The `ppo` stage's checkpoints in .rlhf/checkpoints/ppo, valid for the same params (but ppo.resume_every), seed,
    ``inputs`` and launch: the process count and distributed type are part of it (every rank restores its own RNG
    file, and the sampled episodes depend on the number of ranks), the launch profile's content too."""
    launch = {"num_processes": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value}
    return ResumeCheckpoints.for_stage(
        "ppo",
        config.resume_every,
        config_part(config),
        seed,
        launch,
        Path(config.config_file),
        *inputs,
        notify=notify,
        processes=processes_of(accelerator),
        noun="resume checkpoint",
        unit="iteration",
    )


def open_checkpoints(
    checkpoints: ResumeCheckpoints,
    accelerator: Accelerator,
    validate: Callable[[dict], str | None] = lambda extras: None,
) -> dict | None:
    """Every process, before training: :meth:`~rlhf.checkpoint.ResumeCheckpoints.open` for this launch; returns the
    checkpoint's ``extras`` (None: a fresh start)."""
    checkpoints.processes = processes_of(accelerator)
    return checkpoints.open(validate, unsupported=unsupported_resume(accelerator))


def restore_training(
    checkpoints: ResumeCheckpoints,
    accelerator: Accelerator,
    prepared: PreparedTraining,
    kl_controller: FixedKLController | AdaptiveKLController,
    generators: dict[str, torch.Generator],
) -> list[dict]:
    """Every process, after :func:`~rlhf.ppo_trainer.optimise.prepare_training`: weights, optimiser state, KL
    coefficient and this rank's RNG streams as they were after the checkpoint's iteration; returns the metric history
    of the iterations before it ([] on a fresh start). Opens ``checkpoints`` first unless the caller did."""
    if not checkpoints.opened:
        open_checkpoints(checkpoints, accelerator)
    found = checkpoints.resume()
    if found is None:
        return []
    state = found[1]
    load_trainable_state(accelerator.unwrap_model(prepared.module), state)
    prepared.optimizer.load_state_dict(state["optimizer"])  # after prepare: the usual order (device placement)
    kl_controller.value = state["kl_controller"]["value"]
    checkpoints.load_rng(generators)
    return list(state["history"])


def save_training(
    checkpoints: ResumeCheckpoints,
    iteration: int,
    accelerator: Accelerator,
    prepared: PreparedTraining,
    generators: dict[str, torch.Generator],
    kl_coef: float,
    history: list[dict],
) -> None:
    """Every process (a collective): the checkpoint after ``iteration``; see the module docstring for its content."""

    def state() -> dict:  # main process only
        return {
            **trainable_state(accelerator.unwrap_model(prepared.module)),
            "optimizer": prepared.optimizer.state_dict(),
            "scheduler": {
                "iteration": iteration,
                "lr": prepared.optimizer.param_groups[0]["lr"],
            },  # lr is a function of the iteration
            "kl_controller": {"value": float(kl_coef)},
            "iteration": iteration,
            "history": history,
            "extras": checkpoints.extras(),
        }

    checkpoints.save(iteration, state, generators)


def trainable_state(module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The trained tensors of the unwrapped :func:`trainable_module`, split into ``policy`` (all its weights, or only
    the LoRA adapters) and ``value`` (critic or value head). Frozen weights are not saved: they are the stage's
    inputs."""
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
        raise CheckpointError(
            f"the checkpoint's trained tensors do not match the model (e.g. {sorted(set(saved) ^ trained)[:3]})"
        )
    _, unexpected = module.load_state_dict(saved, strict=False)
    if unexpected:
        raise CheckpointError(f"unexpected tensors in the checkpoint: {unexpected[:3]}")
