"""Stage `ppo`: PPO against the reward model with a KL penalty to the frozen SFT policy.

    accelerate launch --config_file ${ppo.config_file} --num_processes ${ppo.num_processes} \
        --mixed_precision ${ppo.mixed_precision} -m tasks.ppo          # e.g. configs/cpu-2proc.yaml, 2, no

Every process loads the models; only the main process logs and writes models/policy, metrics/ppo.json,
plots/ppo.csv and models/policy_checkpoints/step-N (every ppo.checkpoint_every iterations and the last; the evaluate
stage scores them for the over-optimisation curve). Profiles and memory options: README "Scaling PPO".

Crash safety: every ppo.resume_every iterations a resume checkpoint goes to .rlhf/checkpoints/ppo (outside DVC's
outs, which DVC deletes before a rerun); a rerun with the same params, inputs and launch resumes from it. The policy
snapshots are written into .rlhf/checkpoints/ppo/policy_checkpoints and moved to models/policy_checkpoints at the end,
so those of iterations before a kill survive it. NaN/inf in training stops the stage (exit 3) with the checkpoint kept.
"""

from __future__ import annotations

import copy
import csv
import resource
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf import data
from rlhf.checkpoint import config_part
from rlhf.config import ConfigError, PPOConfig, load_params
from rlhf.guards import NonFiniteError
from rlhf.modeling import check_prompts_fit, count_parameters, load_tokenizer, set_seed
from rlhf.modeling import merge_lora
from rlhf.ppo_trainer import PreparedTraining, ResumeCheckpoints, export_policy, load_ppo_models, make_accelerator, prepare_training, train_ppo
from rlhf.files import replace_folder, staging_folder
from tasks.stage_io import release_free_heap, tune_malloc_for_training, EXIT_DIVERGED, emit, fail, progress_logger, refuse_bad_input
from rlhf.validation import check_model_dir, check_same_tokenizer, check_tokenizer_fits_model, read_records

SFT_MODEL, REWARD_MODEL, PROMPTS = Path("models/sft"), Path("models/reward"), Path("data/prompts/train.jsonl")
OUT_DIR, METRICS, HISTORY = Path("models/policy"), Path("metrics/ppo.json"), Path("plots/ppo.csv")
CHECKPOINTS = Path("models/policy_checkpoints")
SUMMARY_KEYS = ("objective/kl", "objective/scores", "objective/rlhf_reward", "objective/kl_coef", "ppo/policy/clipfrac", "ppo/policy/approxkl", "ppo/policy/entropy", "val/response_length", "val/num_eos_tokens")


def peak_rss_mib() -> float:
    """Peak resident memory of this (main) process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_history(history: list[dict]) -> None:
    HISTORY.parent.mkdir(parents=True, exist_ok=True)
    with HISTORY.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def save_policy(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: PPOConfig, folder: Path) -> None:
    """A loadable policy folder whose generation config samples as in training."""
    policy.generation_config.update(do_sample=True, temperature=config.temperature, top_k=0, top_p=1.0, max_new_tokens=config.response_length,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    policy.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def checkpoint_steps(config: PPOConfig) -> set[int]:
    """Iterations after which the policy is saved: every ``checkpoint_every`` and always the last."""
    every = config.checkpoint_every or config.iterations
    return set(range(every, config.iterations + 1, every)) | {config.iterations}


class PolicySnapshots:
    """``on_iteration`` callback of train_ppo: the policy after the :func:`checkpoint_steps` iterations, as ``step-N``
    folders in ``folder`` (main process), moved to models/policy_checkpoints when training ends.

    ``folder`` lies in the resume area (.rlhf/checkpoints/ppo/policy_checkpoints), not in a staging folder under
    models/: a rerun resuming from iteration N needs the snapshots of iterations ≤ N, and cannot re-create them (the
    resume checkpoint holds only the latest weights). Each resume checkpoint records :attr:`written`; on resume the
    folder is cut back to that list (:meth:`keep_only`), dropping snapshots of iterations that will run again.
    """

    def __init__(self, config: PPOConfig, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
        self.config, self.tokenizer, self.folder = config, tokenizer, folder
        self.steps = checkpoint_steps(config)
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
                shutil.rmtree(target, ignore_errors=True)  # left by a run killed after writing it, before its resume checkpoint
                save_policy(policy, self.tokenizer, self.config, target)
        self.written.append(step)

    def missing(self, written: list[int]) -> str | None:
        """Why a resume checkpoint that recorded ``written`` cannot be used (a snapshot it relies on is gone), or None."""
        gone = [step for step in written if not (self.folder / f"step-{step}" / "config.json").is_file()]
        return f"the policy snapshots {gone} it recorded are missing from {self.folder}" if gone else None

    def keep_only(self, written: list[int], main: bool) -> None:
        """Resume: the snapshots ``written`` before the checkpoint stay; later ones (their iterations rerun) go."""
        self.written = list(written)
        if main and self.folder.is_dir():
            for path in self.folder.iterdir():
                if path.name not in {f"step-{step}" for step in written}:
                    shutil.rmtree(path)


def resume_checkpoints(params, config: PPOConfig, accelerator: Accelerator) -> ResumeCheckpoints:
    """The stage's resume checkpoints, valid for the same params (but ppo.resume_every), seed, inputs and launch.

    The process count and distributed type are part of it: every rank restores its own RNG file, and the sampled
    episodes depend on the number of ranks; the launch profile's content too (a changed profile is another launch).
    """
    notify = (lambda event, fields: emit("ppo", event, **fields)) if accelerator.is_main_process else (lambda event, fields: None)
    launch = {"num_processes": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value}
    return ResumeCheckpoints.for_stage("ppo", config.resume_every, config_part(config, ignore=("resume_every",)), params.seed + 4, launch,
                                       Path(config.config_file), SFT_MODEL, REWARD_MODEL, PROMPTS, notify=notify)


def main() -> None:
    with refuse_bad_input():  # cheap checks only (params, prompts, model folders, tokenizers), before any model loads
        params = load_params()
        config = params.ppo
        prompts = read_records(PROMPTS, data.validate_prompts)
        for folder in (SFT_MODEL, REWARD_MODEL):
            check_model_dir(folder)
        tokenizer = load_tokenizer(SFT_MODEL)
        check_same_tokenizer(tokenizer, SFT_MODEL, load_tokenizer(REWARD_MODEL), REWARD_MODEL)  # the RM scores the policy's ids
        for folder in (SFT_MODEL, REWARD_MODEL):
            check_tokenizer_fits_model(tokenizer, folder)
        check_prompts_fit(tokenizer, [r["prompt"] for r in prompts], SFT_MODEL, config.response_length, str(PROMPTS))
    try:
        accelerator = make_accelerator(config)
        config.derived(accelerator.num_processes)
    except ConfigError as error:
        fail(str(error))
    tune_malloc_for_training()
    set_seed(params.seed + 4)
    models = load_ppo_models(config, SFT_MODEL, REWARD_MODEL)
    prepared = prepare_training(models, config, accelerator)
    log = progress_logger("ppo") if accelerator.is_main_process else (lambda record: None)
    if accelerator.is_main_process:
        trainable = sum(p.numel() for p in prepared.module.parameters() if p.requires_grad)
        emit("ppo", "start", world_size=accelerator.num_processes, distributed_type=accelerator.distributed_type.value,
             mixed_precision=accelerator.mixed_precision, iterations=config.iterations, rollout_batch_size=config.rollout_batch_size,
             policy_parameters=count_parameters(models.policy), trainable_parameters=trainable)
    resume = resume_checkpoints(params, config, accelerator)
    snapshots = PolicySnapshots(config, models.tokenizer, resume.folder / "policy_checkpoints")
    resumed = resume.open(accelerator, validate=lambda extras: snapshots.missing(extras.get("policy_snapshots", [])))
    if resumed is not None:
        snapshots.keep_only(resumed.get("policy_snapshots", []), accelerator.is_main_process)
    accelerator.wait_for_everyone()
    resume.extras = lambda: {"policy_snapshots": list(snapshots.written)}
    try:
        history = train_ppo(models, [r["prompt"] for r in prompts], config, params.seed + 4, accelerator, log, prepared, snapshots, resume, release_free_heap)
    except NonFiniteError as error:
        fail(f"{error}; {resume.kept()}", code=EXIT_DIVERGED)
    policy = export_policy(accelerator, prepared.module)  # every process: a collective under FSDP
    if accelerator.is_main_process:
        staging = staging_folder(OUT_DIR)
        save_policy(policy, models.tokenizer, config, staging)
        replace_folder(staging, OUT_DIR)
        replace_folder(snapshots.folder, CHECKPOINTS)
        write_history(history)
        last = history[-1]
        tail = history[-max(1, len(history) // 10):]  # mean over the last 10 % of iterations: less noisy than the last one
        metrics = {f"final/{k}": last[k] for k in SUMMARY_KEYS}
        metrics.update({f"tail_mean/{k}": sum(r[k] for r in tail) / len(tail) for k in SUMMARY_KEYS})
        metrics.update({
            "world_size": accelerator.num_processes,
            "peak_rss_mib": peak_rss_mib(),
            **({"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20} if accelerator.device.type == "cuda" else {}),
            "iterations": config.iterations,
            "resumed_from_iteration": resume.step,
            "episodes": last["episodes"],
            "episodes_per_second": last["episodes"] / sum(r["timing/iteration"] for r in history),
            "seconds": sum(r["timing/iteration"] for r in history),
        })
        data.write_json(METRICS, metrics)
        emit("ppo", "metrics", **metrics)
    accelerator.wait_for_everyone()
    resume.clear(accelerator)  # the final outputs are in place: resume state no longer needed
    accelerator.end_training()


def run() -> None:
    """main(), with a deliberate stop (bad input: exit 2, diverged: exit 3) also reported as an ``@rlhf failed`` event:
    `accelerate launch` and `dvc repro` exit 1 / 255 whatever the stage's status, and the Prefect flow must tell a
    stop that a retry cannot fix from a crash that a retry resumes (flows/stages.py)."""
    try:
        main()
    except SystemExit as stop:
        if stop.code in (2, EXIT_DIVERGED):
            emit("ppo", "failed", exit_code=stop.code)
        raise


if __name__ == "__main__":
    run()
