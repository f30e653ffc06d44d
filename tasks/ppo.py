"""Stage `ppo`: PPO against the reward model with a KL penalty to the frozen SFT policy.

    accelerate launch --config_file ${ppo.config_file} --num_processes ${ppo.num_processes} \
        --mixed_precision ${ppo.mixed_precision} -m tasks.ppo          # e.g. configs/cpu-2proc.yaml, 2, no

Every process loads the models; only the main process logs and writes models/policy, metrics/ppo.json,
plots/ppo.csv and models/policy_checkpoints/step-N (every ppo.checkpoint_every iterations and the last; the evaluate
stage scores them for the over-optimisation curve). Profiles and memory options: README "Scaling PPO".
"""

from __future__ import annotations

import copy
import csv
import resource
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf import data
from rlhf.config import ConfigError, PPOConfig, load_params
from rlhf.data import DataError
from rlhf.modeling import check_prompts_fit, count_parameters, load_tokenizer, set_seed
from rlhf.modeling import merge_lora
from rlhf.ppo_trainer import PreparedTraining, export_policy, load_ppo_models, make_accelerator, prepare_training, train_ppo
from rlhf.stage import emit, fail, progress_logger, replace_folder, staging_folder

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


def checkpoint_saver(config: PPOConfig, tokenizer: PreTrainedTokenizerBase, staging: Path | None):
    """``on_iteration`` callback of train_ppo that writes ``staging/step-N`` at the checkpoint steps (main process)."""
    steps = checkpoint_steps(config)

    def save(step: int, accelerator: Accelerator, prepared: PreparedTraining) -> None:
        if step not in steps:
            return
        # a checkpoint must not change training: FSDP's export builds a model (weight init draws from the RNG)
        with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
            if config.lora_rank > 0 and accelerator.distributed_type != DistributedType.FSDP:
                # export_policy merges LoRA in place, which would end training's adapters: merge a copy instead
                unwrapped = accelerator.unwrap_model(prepared.module)
                policy = merge_lora(copy.deepcopy(unwrapped.policy)) if accelerator.is_main_process else None
            else:
                policy = export_policy(accelerator, prepared.module)  # every process: a collective under FSDP
            if accelerator.is_main_process:
                save_policy(policy, tokenizer, config, staging / f"step-{step}")

    return save


def main() -> None:
    try:
        params = load_params()
        config = params.ppo
        prompts = data.read_jsonl(PROMPTS)
        data.validate_prompts(prompts, str(PROMPTS))
        check_prompts_fit(load_tokenizer(SFT_MODEL), [r["prompt"] for r in prompts], SFT_MODEL, config.response_length, str(PROMPTS))
    except (ConfigError, DataError) as error:
        fail(str(error))
    try:
        accelerator = make_accelerator(config)
        config.derived(accelerator.num_processes)
    except ConfigError as error:
        fail(str(error))
    set_seed(params.seed + 4)
    models = load_ppo_models(config, SFT_MODEL, REWARD_MODEL)
    prepared = prepare_training(models, config, accelerator)
    log = progress_logger("ppo") if accelerator.is_main_process else (lambda record: None)
    if accelerator.is_main_process:
        trainable = sum(p.numel() for p in prepared.module.parameters() if p.requires_grad)
        emit("ppo", "start", world_size=accelerator.num_processes, distributed_type=accelerator.distributed_type.value,
             mixed_precision=accelerator.mixed_precision, iterations=config.iterations, rollout_batch_size=config.rollout_batch_size,
             policy_parameters=count_parameters(models.policy), trainable_parameters=trainable)
    checkpoint_staging = staging_folder(CHECKPOINTS) if accelerator.is_main_process else None
    save_checkpoint = checkpoint_saver(config, models.tokenizer, checkpoint_staging)
    history = train_ppo(models, [r["prompt"] for r in prompts], config, params.seed + 4, accelerator, log, prepared, save_checkpoint)
    policy = export_policy(accelerator, prepared.module)  # every process: a collective under FSDP
    if accelerator.is_main_process:
        staging = staging_folder(OUT_DIR)
        save_policy(policy, models.tokenizer, config, staging)
        replace_folder(staging, OUT_DIR)
        replace_folder(checkpoint_staging, CHECKPOINTS)
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
            "episodes": last["episodes"],
            "episodes_per_second": last["episodes"] / sum(r["timing/iteration"] for r in history),
            "seconds": sum(r["timing/iteration"] for r in history),
        })
        data.write_json(METRICS, metrics)
        emit("ppo", "metrics", **metrics)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
