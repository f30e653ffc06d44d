"""Stage `ppo`: PPO against the reward model with a KL penalty to the frozen SFT policy.

    accelerate launch --config_file configs/cpu-1proc.yaml -m tasks.ppo

Every process loads the models; only the main process writes models/policy, metrics/ppo.json and plots/ppo.csv.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from accelerate import Accelerator

from rlhf import data
from rlhf.config import ConfigError, load_params
from rlhf.data import DataError
from rlhf.modeling import RewardNormalization, check_prompts_fit, load_policy, load_scalar_model, load_tokenizer, set_seed
from rlhf.ppo_trainer import PPOModels, train_ppo
from rlhf.stage import emit, fail, progress_logger, replace_folder, staging_folder

SFT_MODEL, REWARD_MODEL, PROMPTS = Path("models/sft"), Path("models/reward"), Path("data/prompts/train.jsonl")
OUT_DIR, METRICS, HISTORY = Path("models/policy"), Path("metrics/ppo.json"), Path("plots/ppo.csv")
SUMMARY_KEYS = ("objective/kl", "objective/scores", "objective/rlhf_reward", "objective/kl_coef", "ppo/policy/clipfrac", "ppo/policy/approxkl", "ppo/policy/entropy", "val/response_length", "val/num_eos_tokens")


def load_models(critic_from_reward: bool) -> PPOModels:
    tokenizer = load_tokenizer(SFT_MODEL)
    critic = load_scalar_model(REWARD_MODEL, tokenizer.pad_token_id)
    if not critic_from_reward:
        torch.nn.init.zeros_(critic.score.weight)
    return PPOModels(
        policy=load_policy(SFT_MODEL),
        reference=load_policy(SFT_MODEL).requires_grad_(False),
        critic=critic,
        reward_model=load_scalar_model(REWARD_MODEL, tokenizer.pad_token_id).requires_grad_(False),
        reward_normalization=RewardNormalization.load(REWARD_MODEL),
        tokenizer=tokenizer,
    )


def write_history(history: list[dict]) -> None:
    HISTORY.parent.mkdir(parents=True, exist_ok=True)
    with HISTORY.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def main() -> None:
    try:
        params = load_params()
        config = params.ppo
        prompts = data.read_jsonl(PROMPTS)
        data.validate_prompts(prompts, str(PROMPTS))
        check_prompts_fit(load_tokenizer(SFT_MODEL), [r["prompt"] for r in prompts], SFT_MODEL, config.response_length, str(PROMPTS))
    except (ConfigError, DataError) as error:
        fail(str(error))
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps)
    try:
        config.derived(accelerator.num_processes)
    except ConfigError as error:
        fail(str(error))
    set_seed(params.seed + 4)
    models = load_models(config.value_init == "reward")
    emit("ppo", "start", world_size=accelerator.num_processes, iterations=config.iterations, rollout_batch_size=config.rollout_batch_size)
    history = train_ppo(models, [r["prompt"] for r in prompts], config, params.seed + 4, accelerator, progress_logger("ppo"))
    if accelerator.is_main_process:
        policy = accelerator.unwrap_model(models.policy)
        staging = staging_folder(OUT_DIR)
        policy.generation_config.update(do_sample=True, temperature=config.temperature, top_k=0, top_p=1.0, max_new_tokens=config.response_length,
                                        eos_token_id=models.tokenizer.eos_token_id, pad_token_id=models.tokenizer.pad_token_id)
        policy.save_pretrained(staging, safe_serialization=True)
        models.tokenizer.save_pretrained(staging)
        replace_folder(staging, OUT_DIR)
        write_history(history)
        last = history[-1]
        tail = history[-max(1, len(history) // 10):]  # mean over the last 10 % of iterations: less noisy than the last one
        metrics = {f"final/{k}": last[k] for k in SUMMARY_KEYS}
        metrics.update({f"tail_mean/{k}": sum(r[k] for r in tail) / len(tail) for k in SUMMARY_KEYS})
        metrics.update({
            "world_size": accelerator.num_processes,
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
