"""Stage `evaluate`: the PPO policy against the SFT policy on held-out prompts (proxy RM and gold side by side).

    python -m tasks.launch -m tasks.evaluate --policy models/policy --snapshots models/policy_checkpoints \
        --sft models/sft --reward models/reward --prompts data/prompts/eval.jsonl --history plots/ppo.csv \
        --metrics metrics/evaluate.json \
        --samples metrics/samples.md --curve plots/overoptimization.csv --curve-png plots/overoptimization.png \
        --training-png plots/ppo_training.png

Writes metrics/evaluate.json (the final policy), metrics/samples.md, plots/overoptimization.csv (every PPO policy
snapshot in models/policy_checkpoints, and the SFT policy as step 0, scored on the first evaluate.snapshot_prompts
prompts) and two PNGs rendered offline: plots/ppo_training.png (from plots/ppo.csv) and plots/overoptimization.png.
Under `accelerate launch` (params.yaml's `launch`) each process samples and scores its shard of the prompts on its
device; the main process computes the metrics and writes every output.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from rlhf import data
from rlhf.config import ConfigError
from rlhf.distributed import make_accelerator
from rlhf.evaluation import checkpoint_summary, compare_policies, sample_and_score, samples_table
from rlhf.files import read_csv, write_csv, write_json, write_text
from rlhf.modeling import RewardNormalization, check_prompts_fit, load_policy, load_scalar_model, load_tokenizer
from rlhf.params import load_params
from rlhf.validation import check_model_dir, check_same_tokenizer, check_tokenizer_fits_model, load_judge, read_records
from tasks.stage_io import emit, fail, parse_paths, refuse_bad_input, reports_full_disk, start_events
from tasks.stall import end_stage


def checkpoint_folders(snapshots: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every saved PPO policy snapshot in ``snapshots``, in training order."""
    found = [
        (int(m.group(1)), path) for path in snapshots.glob("step-*") if (m := re.fullmatch(r"step-(\d+)", path.name))
    ]
    return sorted(found)


def render_plots(curve: list[dict], args: argparse.Namespace) -> None:
    """The PNGs; skipped with a warning where matplotlib is missing (stage programs need only torch + transformers)."""
    try:
        import matplotlib  # noqa: F401

        from rlhf.plots import plot_overoptimization, plot_ppo_training
    except ImportError:
        print("evaluate: matplotlib is not installed; PNG plots skipped", file=sys.stderr)
        return
    if args.history.exists():
        plot_ppo_training(read_csv(args.history), args.training_png)
    plot_overoptimization([{k: str(v) for k, v in row.items()} for row in curve], args.curve_png)


@reports_full_disk("evaluate")  # a full disk: one line, exit 4 (tasks/stage_io.py)
def main(argv: list[str] | None = None) -> None:
    start_events("evaluate")  # this run's events only (.rlhf/logs/evaluate.jsonl)
    args = parse_paths(
        argv,
        "python -m tasks.evaluate",
        "policy snapshots sft reward prompts history metrics samples curve curve_png training_png",
    )
    with refuse_bad_input():  # cheap checks only: params, prompts, model folders, tokenizers, the judges' imports
        params = load_params()
        config = params.evaluate
        prompts = read_records(args.prompts, data.validate_prompts)
        for folder in (args.policy, args.sft, args.reward, *(path for _, path in checkpoint_folders(args.snapshots))):
            check_model_dir(folder)
        tokenizer = load_tokenizer(args.policy)
        for folder in (args.sft, args.reward):  # one tokenizer for all: the RM and the reference score the policy's ids
            check_same_tokenizer(tokenizer, args.policy, load_tokenizer(folder), folder)
        for folder in (args.policy, args.sft, args.reward):
            check_tokenizer_fits_model(tokenizer, folder)
        check_prompts_fit(
            tokenizer, [r["prompt"] for r in prompts], args.policy, config.max_new_tokens, str(args.prompts)
        )
        gold = load_judge(config.gold, "evaluate.gold") if config.gold else None
        is_valid = load_judge(config.validity, "evaluate.validity") if config.validity else None
    prompts = [r["prompt"] for r in (prompts[: config.n_prompts] if config.n_prompts else prompts)]
    try:
        accelerator = make_accelerator(params.launch.for_stage("evaluate"), "evaluate")
    except ConfigError as error:
        fail(str(error))
    main_process, device = accelerator.is_main_process, accelerator.device
    sft = load_policy(args.sft).eval().to(device)
    policy = load_policy(args.policy).eval().to(device)
    reward_model = load_scalar_model(args.reward, tokenizer.pad_token_id).eval().to(device)
    normalization = RewardNormalization.load(args.reward)
    common = dict(
        reward_model=reward_model,
        normalization=normalization,
        tokenizer=tokenizer,
        prompts=prompts,
        samples_per_prompt=config.samples_per_prompt,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=params.stage_seed("evaluate"),
        batch_size=config.batch_size,
        accelerator=accelerator,
        sampling_seeds=config.sampling_seeds,
    )
    checkpoints = checkpoint_folders(args.snapshots)
    total = 3 + len(checkpoints)  # policy, SFT, SFT on the checkpoint prompts, each checkpoint
    progress = (lambda **fields: emit("evaluate", "progress", **fields)) if main_process else (lambda **fields: None)
    policy_samples = sample_and_score(policy, sft, **common)
    progress(step=1, total=total)
    sft_samples = sample_and_score(sft, sft, **common)
    progress(step=2, total=total)
    metrics = compare_policies(
        policy_samples,
        sft_samples,
        gold,
        is_valid,
        seed=params.stage_seed("evaluate"),
        n_resamples=config.bootstrap_resamples,
    )
    # over-optimisation: proxy vs gold along the PPO trajectory, every checkpoint on the same prompts and seed
    subset = dict(common, prompts=prompts[: config.snapshot_prompts] if config.snapshot_prompts else prompts)
    curve = [{"step": 0, **checkpoint_summary(sample_and_score(sft, sft, **subset), gold, is_valid)}]
    progress(step=3, total=total)
    for done, (step, folder) in enumerate(checkpoints, start=4):
        checkpoint = load_policy(folder).eval().to(device)
        curve.append({"step": step, **checkpoint_summary(sample_and_score(checkpoint, sft, **subset), gold, is_valid)})
        progress(step=done, total=total, checkpoint=step)
    if main_process:
        write_outputs(args, params, metrics, curve, policy_samples, sft_samples, gold)
    accelerator.wait_for_everyone()
    end_stage(accelerator)  # several processes: exits here, past a teardown that can deadlock


def write_outputs(args, params, metrics: dict, curve: list[dict], policy_samples, sft_samples, gold) -> None:
    """The main process's outputs: curve CSV and PNGs, metrics with the KL band verdict, the sample table."""
    config = params.evaluate
    write_csv(args.curve, curve)
    render_plots(curve, args)
    # the adaptive controller aims at kl_target; within ±50 % of it counts as on target
    low, high = 0.5 * params.ppo.kl_target, 1.5 * params.ppo.kl_target
    metrics["kl_target"] = params.ppo.kl_target
    metrics["kl_target_band"] = [low, high]
    metrics["kl_in_target_band"] = bool(low <= metrics["kl_to_ref"] <= high)
    write_json(args.metrics, metrics)
    write_text(
        args.samples,
        "# Samples: SFT vs PPO on held-out prompts\n\n"
        + samples_table(policy_samples, sft_samples, gold, config.n_samples_table),
    )
    emit("evaluate", "metrics", **metrics)


if __name__ == "__main__":
    main()
