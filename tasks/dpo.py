"""Stage `ppo` with ``ppo.algorithm: dpo``: DPO (Rafailov et al. 2023) from the SFT model on the labelled preference
pairs, offline: no sampling and no reward model in the loop (docs/design.md §4b).

    python -m tasks.launch -m tasks.ppo \
        --sft models/sft --reward models/reward --prompts data/prompts/train.jsonl --preferences data/preferences \
        --out models/policy --snapshots models/policy_checkpoints --metrics metrics/ppo.json --history plots/ppo.csv \
        --live dvclive/ppo

tasks/ppo.py reads params.yaml and hands over what DPO reads (``main(args, params.dpo, params.ppo, launch, seed)``); the
paths are the PPO stage's. DPO reads
models/sft (the policy's start and its frozen reference) and data/preferences/{train,eval}.jsonl (the reward stage's
inputs); models/reward and the prompts stay inputs of the stage but are not read. It writes exactly what the PPO path
writes, so `evaluate` and `release` take either:

- models/policy: the trained causal LM and its tokenizer, with the PPO path's generation config (rlhf/ppo_trainer/
  snapshots.py ``save_policy``: ppo.temperature, ppo.response_length);
- models/policy_checkpoints/step-N: the same format every dpo.snapshot_every steps and the last (evaluate scores
  them for its over-optimisation curve);
- plots/ppo.csv: one row per step, the ``dpo/…`` statistics (rlhf/dpo_training.py ``train_dpo``), which evaluate plots;
  the same curves as DVCLive metrics in dvclive/ppo;
- metrics/ppo.json: ``algorithm: dpo``, the final and tail-mean statistics, held-out preference accuracy, time and
  peak memory.

No resume checkpoints (see ``train_dpo``); both model folders are assembled in ``.partial`` staging folders and
renamed into place at the end, so a killed run leaves the previous outputs whole. NaN/inf in training stops the stage
with exit 3, before any output is written.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf import data
from rlhf.config import ConfigError, DPOConfig, Launch, PPOConfig
from rlhf.distributed import make_accelerator
from rlhf.dpo_training import DPO_EVAL_STATS, DPO_STATS, train_dpo
from rlhf.files import is_no_space, replace_folder, staging_folder, tensor_bytes, write_csv, write_folder, write_json
from rlhf.guards import NonFiniteError
from rlhf.modeling import count_parameters, load_policy, load_tokenizer, max_positions, set_seed
from rlhf.ppo_trainer.snapshots import save_policy
from rlhf.training import Prepared, exported_model, micro_batch_size
from rlhf.validation import check_model_dir, check_tokenizer_fits_model, read_records
from tasks.stage_io import EXIT_DIVERGED, TrainingLog, emit, fail, refuse_bad_input, tune_malloc_for_training
from tasks.stall import end_stage


def read_preferences(folder: Path, tokenizer, limit: int | None) -> dict[str, list[dict]]:
    """The train and eval pairs of ``folder`` as the reward stage reads them, each prompt + response + EOS within the
    model's ``limit`` positions (DataError naming the file and row otherwise)."""
    splits = {}
    for split in ("train", "eval"):
        path = folder / f"{split}.jsonl"
        rows = read_records(path, data.validate_preferences)
        if limit:
            for side in ("chosen", "rejected"):
                texts = [r["prompt"] + r[side] for r in rows]
                data.check_lengths(texts, tokenizer, limit - 1, str(path), f"prompt + {side}")
        splits[split] = rows
    return splits


def snapshot_saver(folder: Path, tokenizer, ppo: PPOConfig) -> Callable[[int, Prepared], None]:
    """``on_snapshot`` of train_dpo: the policy after step N as ``folder/step-N``, in PPO's snapshot format."""

    def save(step: int, prepared: Prepared) -> None:
        # a snapshot must not change training: FSDP's export builds a model (weight init draws from the RNG)
        accelerator = prepared.accelerator
        with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
            policy = exported_model(prepared)  # every process: a collective under FSDP
        if policy is not None:
            save_policy(policy, tokenizer, ppo, folder / f"step-{step}")

    return save


def summary(history: list[dict]) -> dict[str, float | None]:
    """The last step's statistics (``final/…``, held-out ones included) and their mean over the last 10 % of steps
    (``tail_mean/…``: less noisy than one batch)."""
    last, tail = history[-1], history[-max(1, len(history) // 10) :]
    metrics = {f"final/{name}": last[name] for name in DPO_STATS + DPO_EVAL_STATS}
    metrics.update({f"tail_mean/{name}": sum(row[name] for row in tail) / len(tail) for name in DPO_STATS})
    return metrics


def main(args: argparse.Namespace, config: DPOConfig, ppo: PPOConfig, launch: Launch, seed: int) -> None:
    """``ppo``: the generation settings saved with the policy (save_policy); ``launch``: the ppo stage's."""
    with refuse_bad_input():  # cheap checks only: the SFT folder, its tokenizer, the preference pairs
        check_model_dir(args.sft)
        tokenizer = load_tokenizer(args.sft)
        check_tokenizer_fits_model(tokenizer, args.sft)
        splits = read_preferences(args.preferences, tokenizer, max_positions(args.sft))
        if len(splits["train"]) < config.batch_size:
            raise ConfigError(
                f"{args.preferences / 'train.jsonl'}: {len(splits['train'])} pairs, fewer than one step's "
                f"dpo.batch_size ({config.batch_size}). Fix: lower dpo.batch_size in params.yaml or label more pairs."
            )
    try:
        accelerator = make_accelerator(launch, "ppo")
        micro_batch_size(config, accelerator)  # the global batch must split exactly
    except ConfigError as error:
        fail(str(error))
    tune_malloc_for_training()
    set_seed(seed)
    model = load_policy(args.sft)
    main_process = accelerator.is_main_process
    if main_process:
        emit(
            "ppo",
            "start",
            algorithm="dpo",
            world_size=accelerator.num_processes,
            distributed_type=accelerator.distributed_type.value,
            mixed_precision=accelerator.mixed_precision,
            steps=len(splits["train"]) // config.batch_size * config.epochs,
            n_train_pairs=len(splits["train"]),
            policy_parameters=count_parameters(model),
        )
    # other processes never write a snapshot (exported_model gives them None)
    snapshots = staging_folder(args.snapshots) if main_process else args.snapshots
    started = time.perf_counter()
    try:
        policy, history = train_dpo(
            model,
            tokenizer,
            config,
            seed,
            splits["train"],
            splits["eval"],
            accelerator,
            TrainingLog("ppo", args.live, main_process),
            snapshot_saver(snapshots, tokenizer, ppo),
        )
    except NonFiniteError as error:
        fail(str(error), code=EXIT_DIVERGED)
    except Exception as error:
        if main_process and is_no_space(error):  # a snapshot filled the disk: its staging folder goes
            shutil.rmtree(snapshots, ignore_errors=True)
        raise
    if main_process:
        with write_folder(args.out, needed=tensor_bytes(policy.state_dict().values())) as staging:
            save_policy(policy, tokenizer, ppo, staging)
        replace_folder(snapshots, args.snapshots)
        write_csv(args.history, history)
        metrics = {
            "algorithm": "dpo",
            "loss": config.loss,
            "beta": config.beta,
            **summary(history),
            "world_size": accelerator.num_processes,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux, as tasks/ppo.py
            **(
                {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20} if accelerator.device.type == "cuda" else {}
            ),
            "steps": len(history),
            "epochs": config.epochs,
            "n_train_pairs": len(splits["train"]),
            "n_eval_pairs": len(splits["eval"]),
            "seconds": time.perf_counter() - started,  # the reference log-probs, every step, eval and snapshots
        }
        write_json(args.metrics, metrics)
        emit("ppo", "metrics", **metrics)
    accelerator.wait_for_everyone()
    end_stage(accelerator)  # several processes: exits here, past a teardown that can deadlock
