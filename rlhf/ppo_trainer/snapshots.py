"""Policy snapshots for the evaluation's over-optimisation curve: the policy after every ``ppo.snapshot_every``
iterations and the last (:class:`PolicySnapshots`), as loadable folders (:func:`save_policy`).

They are written during training into the resume area, so a rerun resuming from iteration N still has those of the
iterations before N: the resume checkpoints record which exist (:meth:`PolicySnapshots.resume_with`).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.checkpoint import ResumeCheckpoints
from rlhf.config import PPOConfig
from rlhf.modeling import merge_lora
from rlhf.ppo_trainer.optimise import PreparedTraining
from rlhf.ppo_trainer.processes import export_policy
from rlhf.ppo_trainer.resume import open_checkpoints


def save_policy(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: PPOConfig, folder: Path) -> None:
    """A loadable policy folder whose generation config samples as in training."""
    policy.generation_config.update(
        do_sample=True,
        temperature=config.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=config.response_length,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    policy.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def snapshot_steps(config: PPOConfig) -> set[int]:
    """Iterations after which the policy is saved for evaluation: every ``snapshot_every`` and always the last."""
    every = config.snapshot_every or config.iterations
    return set(range(every, config.iterations + 1, every)) | {config.iterations}


class PolicySnapshots:
    """``on_iteration`` callback of train_ppo: the policy after the :func:`snapshot_steps` iterations, as ``step-N``
    folders in ``folder`` (main process), which the stage moves to models/policy_checkpoints when training ends.

    ``folder`` lies in the resume area (.rlhf/checkpoints/ppo/policy_checkpoints), not in a staging folder under
    models/: a rerun resuming from iteration N needs the snapshots of iterations ≤ N, and cannot re-create them (the
    resume checkpoint holds only the latest weights). Each resume checkpoint records :attr:`written`; on resume the
    folder is cut back to that list (:meth:`keep_only`), dropping snapshots of iterations that will run again.
    """

    def __init__(self, config: PPOConfig, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
        self.config, self.tokenizer, self.folder = config, tokenizer, folder
        self.steps = snapshot_steps(config)
        self.written: list[int] = []

    def __call__(self, step: int, accelerator: Accelerator, prepared: PreparedTraining) -> None:
        if step not in self.steps:
            return
        # a snapshot must not change training: FSDP's export builds a model (weight init draws from the RNG)
        with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
            if self.config.lora_rank > 0 and accelerator.distributed_type != DistributedType.FSDP:
                # export_policy merges LoRA in place, which would end training's adapters: merge a copy instead
                unwrapped = accelerator.unwrap_model(prepared.module)
                policy = merge_lora(copy.deepcopy(unwrapped.policy)) if accelerator.is_main_process else None
            else:
                policy = export_policy(accelerator, prepared.module)  # every process: a collective under FSDP
            if accelerator.is_main_process:
                target = self.folder / f"step-{step}"
                shutil.rmtree(
                    target, ignore_errors=True
                )  # left by a run killed after writing it, before its resume checkpoint
                save_policy(policy, self.tokenizer, self.config, target)
        self.written.append(step)

    def missing(self, written: list[int]) -> str | None:
        """Why a resume checkpoint that recorded ``written`` cannot be used (a snapshot it needs is gone), or None."""
        gone = [step for step in written if not (self.folder / f"step-{step}" / "config.json").is_file()]
        return f"the policy snapshots {gone} it recorded are missing from {self.folder}" if gone else None

    def keep_only(self, written: list[int], main: bool) -> None:
        """Resume: the snapshots ``written`` before the checkpoint stay; later ones (their iterations rerun) go."""
        self.written = list(written)
        if main and self.folder.is_dir():
            for path in self.folder.iterdir():
                if path.name not in {f"step-{step}" for step in written}:
                    shutil.rmtree(path)

    def resume_with(self, checkpoints: ResumeCheckpoints, accelerator: Accelerator) -> None:
        """Every process, before training: open the resume ``checkpoints`` (one whose snapshots are gone is
        discarded), cut the folder back to the snapshots of the checkpoint resumed, and record :attr:`written` in
        every later one."""
        extras = open_checkpoints(
            checkpoints, accelerator, validate=lambda extras: self.missing(extras.get("policy_snapshots", []))
        )
        if extras is not None:
            self.keep_only(extras.get("policy_snapshots", []), accelerator.is_main_process)
        accelerator.wait_for_everyone()
        checkpoints.extras = lambda: {"policy_snapshots": list(self.written)}
