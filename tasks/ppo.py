"""Stage `ppo`: PPO (or, by ``ppo.algorithm``, GRPO, RLOO, REINFORCE++; DPO in tasks/dpo.py) against the reward model
(or a rule, ``ppo.reward``) with a KL penalty to the frozen SFT policy (docs/design.md §4, §4b).

    python -m tasks.launch -m tasks.ppo \
        --sft models/sft --reward models/reward --prompts data/prompts/train.jsonl --preferences data/preferences \
        --out models/policy \
        --snapshots models/policy_checkpoints --metrics metrics/ppo.json --history plots/ppo.csv \
        --live dvclive/ppo

(`accelerate launch` with params.yaml's `launch` for ppo: tasks/launch.py; the paths as dvc.yaml passes them).

Every process loads the models; only the main process logs and writes models/policy, metrics/ppo.json,
plots/ppo.csv, the DVCLive metrics and curves dvclive/ppo (every iteration's statistics) and the policy snapshots
models/policy_checkpoints/step-N (every ppo.snapshot_every iterations and the last; the evaluate stage scores them for
the over-optimisation curve). Profiles and memory options: docs/design.md §6.

Crash safety: every ppo.resume_every iterations a resume checkpoint goes to .rlhf/checkpoints/ppo (outside DVC's
outs, which DVC deletes before a rerun); a rerun with the same params, inputs and launch resumes from it. The policy
snapshots are written into .rlhf/checkpoints/ppo/policy_checkpoints and moved to models/policy_checkpoints at the end,
so those of iterations before a kill survive it. NaN/inf in training stops the stage (exit 3) with the checkpoint kept.
"""

from __future__ import annotations

import resource

import torch

from rlhf import data
from rlhf.checkpoint import kept_on_disk
from rlhf.config import ConfigError
from rlhf.files import is_no_space, replace_folder, tensor_bytes, write_csv, write_folder, write_json
from rlhf.guards import NonFiniteError
from rlhf.modeling import check_prompts_fit, count_parameters, load_tokenizer, set_seed
from rlhf.params import load_params
from rlhf.ppo_trainer.loop import train_ppo
from rlhf.ppo_trainer.models import load_ppo_models
from rlhf.ppo_trainer.optimise import prepare_training
from rlhf.ppo_trainer.processes import export_policy, make_accelerator
from rlhf.ppo_trainer.resume import stage_checkpoints
from rlhf.ppo_trainer.snapshots import PolicySnapshots, save_policy
from rlhf.validation import check_model_dir, check_same_tokenizer, check_tokenizer_fits_model, read_records
from tasks.stage_io import (
    EXIT_DIVERGED,
    EXIT_NO_SPACE,
    TrainingLog,
    checkpoint_events,
    emit,
    fail,
    parse_paths,
    refuse_bad_input,
    release_free_heap,
    reports_full_disk,
    start_events,
    tune_malloc_for_training,
)
from tasks.stall import end_stage

SUMMARY_KEYS = (
    "objective/kl",
    "objective/scores",
    "objective/rlhf_reward",
    "objective/kl_coef",
    "ppo/policy/clipfrac",
    "ppo/policy/approxkl",
    "ppo/policy/entropy",
    "val/response_length",
    "val/num_eos_tokens",
)


def peak_rss_mib() -> float:
    """Peak resident memory of this (main) process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# a full disk: one line naming the resume checkpoint a rerun starts from, exit 4 (tasks/stage_io.py)
@reports_full_disk("ppo", kept=lambda: kept_on_disk("ppo", "iteration"))
def main(argv: list[str] | None = None) -> None:
    start_events("ppo")  # this run's events only (.rlhf/logs/ppo.jsonl)
    args = parse_paths(
        argv, "accelerate launch … -m tasks.ppo", "sft reward prompts preferences out snapshots metrics history live"
    )
    with refuse_bad_input():
        params = load_params()
    if params.ppo.algorithm == "dpo":  # the offline alternative: same stage, inputs and outputs (tasks/dpo.py)
        from tasks import dpo

        return dpo.main(args, params.dpo, params.ppo, params.launch.for_stage("ppo"), params.stage_seed("ppo"))
    with refuse_bad_input():  # cheap checks only (params, prompts, model folders, tokenizers), before any model loads
        config = params.ppo
        prompts = read_records(args.prompts, data.validate_prompts)
        for folder in (args.sft, args.reward):
            check_model_dir(folder)
        tokenizer = load_tokenizer(args.sft)
        check_same_tokenizer(
            tokenizer, args.sft, load_tokenizer(args.reward), args.reward
        )  # the RM scores the policy's ids
        for folder in (args.sft, args.reward):
            check_tokenizer_fits_model(tokenizer, folder)
        check_prompts_fit(
            tokenizer, [r["prompt"] for r in prompts], args.sft, config.response_length, str(args.prompts)
        )
    try:
        accelerator = make_accelerator(config)
        config.derived(accelerator.num_processes)
    except ConfigError as error:
        fail(str(error))
    tune_malloc_for_training()
    seed = params.stage_seed("ppo")
    set_seed(seed)
    models = load_ppo_models(config, args.sft, args.reward)
    prepared = prepare_training(models, config, accelerator)
    log = TrainingLog("ppo", args.live, accelerator.is_main_process)
    if accelerator.is_main_process:
        trainable = sum(p.numel() for p in prepared.module.parameters() if p.requires_grad)
        emit(
            "ppo",
            "start",
            world_size=accelerator.num_processes,
            distributed_type=accelerator.distributed_type.value,
            mixed_precision=accelerator.mixed_precision,
            algorithm=config.algorithm,
            iterations=config.iterations,
            rollout_batch_size=config.rollout_batch_size,
            policy_parameters=count_parameters(models.policy),
            trainable_parameters=trainable,
        )
    # resume checkpoints outside DVC's outs, valid only for these params, seed, inputs and launch
    # (rlhf/ppo_trainer/resume.py)
    resume = stage_checkpoints(
        config,
        seed,
        accelerator,
        (args.sft, args.reward, args.prompts),
        checkpoint_events("ppo"),
    )
    snapshots = PolicySnapshots(config, models.tokenizer, resume.folder / "policy_checkpoints")
    snapshots.resume_with(resume, accelerator)
    try:
        history = train_ppo(
            models,
            [r["prompt"] for r in prompts],
            config,
            seed,
            accelerator,
            log,
            prepared,
            snapshots,
            resume,
            release_free_heap,
        )
    except NonFiniteError as error:
        fail(f"{error}; {resume.kept()}", code=EXIT_DIVERGED)
    except Exception as error:
        if is_no_space(error):  # snapshots after the kept checkpoint (a half-written one too) would be redone anyway
            kept = resume.last_step or 0
            snapshots.keep_only([step for step in snapshots.written if step <= kept], accelerator.is_main_process)
        raise
    policy = export_policy(accelerator, prepared.module)  # every process: a collective under FSDP
    if accelerator.is_main_process:
        with write_folder(args.out, needed=tensor_bytes(policy.state_dict().values())) as staging:
            save_policy(policy, models.tokenizer, config, staging)
        replace_folder(snapshots.folder, args.snapshots)
        write_csv(args.history, history)
        if resume.step:  # the curves from iteration 1, not from the checkpoint
            log.rewrite(history)
        last = history[-1]
        tail = history[
            -max(1, len(history) // 10) :
        ]  # mean over the last 10 % of iterations: less noisy than the last one
        metrics = {f"final/{k}": last[k] for k in SUMMARY_KEYS}
        metrics.update({f"tail_mean/{k}": sum(r[k] for r in tail) / len(tail) for k in SUMMARY_KEYS})
        metrics.update(
            {
                "algorithm": config.algorithm,
                "reward": config.reward,
                "policy_parameters": count_parameters(models.policy),
                "trainable_parameters": sum(p.numel() for p in prepared.module.parameters() if p.requires_grad),
                "world_size": accelerator.num_processes,
                "peak_rss_mib": peak_rss_mib(),
                **(
                    {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}
                    if accelerator.device.type == "cuda"
                    else {}
                ),
                "iterations": config.iterations,
                "resumed_from_iteration": resume.step,
                "episodes": last["episodes"],
                "episodes_per_second": last["episodes"] / sum(r["timing/iteration"] for r in history),
                "seconds": sum(r["timing/iteration"] for r in history),
            }
        )
        write_json(args.metrics, metrics)
        emit("ppo", "metrics", **metrics)
    accelerator.wait_for_everyone()
    resume.clear()  # the final outputs are in place: resume state no longer needed
    end_stage(accelerator)  # several processes: exits here, past a teardown that can deadlock


def run() -> None:
    """main(), with a deliberate stop (bad input: exit 2, diverged: exit 3, disk full: exit 4) also reported as a
    ``failed`` event: `accelerate launch` and `dvc repro` exit 1 / 255 whatever the stage's status, and the Prefect
    flow must tell a stop that a retry cannot fix from a crash that a retry resumes (flows/stages.py)."""
    try:
        main()
    except SystemExit as stop:
        if stop.code in (2, EXIT_DIVERGED, EXIT_NO_SPACE):
            try:
                emit("ppo", "failed", exit_code=stop.code)
            except OSError:  # the events file is on the full disk: DVC's line still carries the exit code
                pass
        raise


if __name__ == "__main__":
    run()
