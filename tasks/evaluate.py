"""Stage `evaluate`: the PPO policy against the SFT policy on held-out prompts (proxy RM and gold side by side).

    python -m tasks.evaluate

Writes metrics/evaluate.json (the final policy), metrics/samples.md, plots/overoptimization.csv (every PPO checkpoint
in models/policy_checkpoints, and the SFT policy as step 0, scored on the first evaluate.checkpoint_prompts prompts)
and two PNGs rendered offline: plots/ppo_training.png (from plots/ppo.csv) and plots/overoptimization.png.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

from rlhf import data
from rlhf.config import load_params
from rlhf.evaluation import checkpoint_summary, compare_policies, sample_and_score, samples_table
from rlhf.modeling import RewardNormalization, check_prompts_fit, load_policy, load_scalar_model, load_tokenizer
from tasks.stage_io import emit, refuse_bad_input
from rlhf.validation import check_model_dir, check_same_tokenizer, check_tokenizer_fits_model, load_judge, read_records

POLICY, SFT_MODEL, REWARD_MODEL = Path("models/policy"), Path("models/sft"), Path("models/reward")
PROMPTS, METRICS, TABLE = Path("data/prompts/eval.jsonl"), Path("metrics/evaluate.json"), Path("metrics/samples.md")
CHECKPOINTS, PPO_HISTORY = Path("models/policy_checkpoints"), Path("plots/ppo.csv")
CURVE, CURVE_PNG, TRAINING_PNG = Path("plots/overoptimization.csv"), Path("plots/overoptimization.png"), Path("plots/ppo_training.png")


def checkpoint_folders() -> list[tuple[int, Path]]:
    """(step, folder) of every saved PPO checkpoint, in training order."""
    found = [(int(m.group(1)), path) for path in CHECKPOINTS.glob("step-*") if (m := re.fullmatch(r"step-(\d+)", path.name))]
    return sorted(found)


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def render_plots(curve: list[dict]) -> None:
    """The PNGs; skipped with a warning where matplotlib is missing (stage programs need only torch + transformers)."""
    try:
        from rlhf.plots import plot_overoptimization, plot_ppo_training

        import matplotlib  # noqa: F401
    except ImportError:
        print("evaluate: matplotlib is not installed; PNG plots skipped", file=sys.stderr)
        return
    if PPO_HISTORY.exists():
        with PPO_HISTORY.open() as handle:
            plot_ppo_training(list(csv.DictReader(handle)), TRAINING_PNG)
    plot_overoptimization([{k: str(v) for k, v in row.items()} for row in curve], CURVE_PNG)


def main() -> None:
    with refuse_bad_input():  # cheap checks only: params, prompts, model folders, tokenizers, the judges' imports
        params = load_params()
        config = params.evaluate
        prompts = read_records(PROMPTS, data.validate_prompts)
        for folder in (POLICY, SFT_MODEL, REWARD_MODEL, *(path for _, path in checkpoint_folders())):
            check_model_dir(folder)
        tokenizer = load_tokenizer(POLICY)
        for folder in (SFT_MODEL, REWARD_MODEL):  # one tokenizer for all: the RM and the reference score the policy's ids
            check_same_tokenizer(tokenizer, POLICY, load_tokenizer(folder), folder)
        for folder in (POLICY, SFT_MODEL, REWARD_MODEL):
            check_tokenizer_fits_model(tokenizer, folder)
        check_prompts_fit(tokenizer, [r["prompt"] for r in prompts], POLICY, config.max_new_tokens, str(PROMPTS))
        gold = load_judge(config.gold, "evaluate.gold") if config.gold else None
        is_valid = load_judge(config.validity, "evaluate.validity") if config.validity else None
    prompts = [r["prompt"] for r in (prompts[: config.n_prompts] if config.n_prompts else prompts)]
    sft = load_policy(SFT_MODEL).eval()
    policy = load_policy(POLICY).eval()
    reward_model = load_scalar_model(REWARD_MODEL, tokenizer.pad_token_id).eval()
    normalization = RewardNormalization.load(REWARD_MODEL)
    common = dict(reward_model=reward_model, normalization=normalization, tokenizer=tokenizer, prompts=prompts,
                  samples_per_prompt=config.samples_per_prompt, max_new_tokens=config.max_new_tokens,
                  temperature=config.temperature, seed=params.seed + 5, batch_size=config.batch_size)
    checkpoints = checkpoint_folders()
    total = 3 + len(checkpoints)  # policy, SFT, SFT on the checkpoint prompts, each checkpoint
    policy_samples = sample_and_score(policy, sft, **common)
    emit("evaluate", "progress", step=1, total=total)
    sft_samples = sample_and_score(sft, sft, **common)
    emit("evaluate", "progress", step=2, total=total)
    metrics = compare_policies(policy_samples, sft_samples, gold, is_valid, seed=params.seed + 5, n_resamples=config.bootstrap_resamples)
    # over-optimisation: proxy vs gold along the PPO trajectory, every checkpoint on the same prompts and seed
    subset = dict(common, prompts=prompts[: config.checkpoint_prompts] if config.checkpoint_prompts else prompts)
    curve = [{"step": 0, **checkpoint_summary(sample_and_score(sft, sft, **subset), gold, is_valid)}]
    emit("evaluate", "progress", step=3, total=total)
    for done, (step, folder) in enumerate(checkpoints, start=4):
        checkpoint = load_policy(folder).eval()
        curve.append({"step": step, **checkpoint_summary(sample_and_score(checkpoint, sft, **subset), gold, is_valid)})
        emit("evaluate", "progress", step=done, total=total, checkpoint=step)
    write_rows(CURVE, curve)
    render_plots(curve)
    # the adaptive controller aims at kl_target; within ±50 % of it counts as on target
    low, high = 0.5 * params.ppo.kl_target, 1.5 * params.ppo.kl_target
    metrics["kl_target"] = params.ppo.kl_target
    metrics["kl_target_band"] = [low, high]
    metrics["kl_in_target_band"] = bool(low <= metrics["kl_to_ref"] <= high)
    data.write_json(METRICS, metrics)
    TABLE.write_text("# Samples: SFT vs PPO on held-out prompts\n\n" + samples_table(policy_samples, sft_samples, gold, config.n_samples_table))
    emit("evaluate", "metrics", **metrics)


if __name__ == "__main__":
    main()
