"""Stage `reward`: Bradley–Terry reward model, initialised from the SFT model, scores normalised on SFT samples.

    python -m tasks.launch -m tasks.reward --sft models/sft --preferences data/preferences --pairs data/pairs \
        --out models/reward --metrics metrics/reward.json --live dvclive/reward

(`accelerate launch` with params.yaml's `launch`: tasks/launch.py). Every process trains on its share of each batch;
the main process normalises the scores and writes models/reward (LoRA merged) and the metrics; its training
curves go to dvclive/reward (DVCLive: tasks/stage_io.py TrainingLog).
"""

from __future__ import annotations

import statistics

from rlhf import data
from rlhf.checkpoint import ResumeCheckpoints, kept_on_disk
from rlhf.config import ConfigError
from rlhf.distributed import launch_part, make_accelerator, processes_of, unsupported_resume
from rlhf.files import tensor_bytes, write_folder, write_json
from rlhf.guards import NonFiniteError
from rlhf.modeling import RewardNormalization, load_scalar_model, load_tokenizer, set_seed
from rlhf.params import load_params
from rlhf.training import micro_batch_size, raw_scores, train_reward_model
from rlhf.validation import check_model_dir, check_tokenizer_fits_model, read_records
from tasks.stage_io import (
    EXIT_DIVERGED,
    TrainingLog,
    checkpoint_events,
    emit,
    fail,
    parse_paths,
    refuse_bad_input,
    reports_full_disk,
    start_events,
)
from tasks.stall import end_stage

N_NORMALIZATION_SAMPLES = 2048


def annotator_agreement(rows: list[dict]) -> float | None:
    """The annotator's own agreement with its noiseless gold on these pairs (ties half), when labels carry it."""
    margins = [row["gold_margin"] for row in rows if "gold_margin" in row]
    if not margins or len(margins) != len(rows):
        return None
    return statistics.fmean(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)


@reports_full_disk("reward", kept=lambda: kept_on_disk("reward"))  # a full disk: one line, exit 4 (tasks/stage_io.py)
def main(argv: list[str] | None = None) -> None:
    start_events("reward")  # this run's events only (.rlhf/logs/reward.jsonl)
    args = parse_paths(argv, "python -m tasks.reward", "sft preferences pairs out metrics live")
    samples_file = args.pairs / "samples.jsonl"
    with refuse_bad_input():  # cheap checks only: params, preference pairs, the SFT folder and its tokenizer
        params = load_params()
        config = params.reward
        check_model_dir(args.sft)
        tokenizer = load_tokenizer(args.sft)
        check_tokenizer_fits_model(tokenizer, args.sft)
        splits = {}
        for split in ("train", "eval"):
            path = args.preferences / f"{split}.jsonl"
            rows = read_records(path, data.validate_preferences)
            for side in ("chosen", "rejected"):
                texts = [r["prompt"] + r[side] for r in rows]
                data.check_lengths(texts, tokenizer, config.max_length - 1, str(path), f"prompt + {side}")
            splits[split] = rows
        samples = read_records(samples_file, data.validate_samples) if samples_file.exists() else []
    try:
        accelerator = make_accelerator(params.launch.for_stage("reward"), "reward")
        micro_batch_size(config, accelerator)  # the global batch must split exactly
    except ConfigError as error:
        fail(str(error))
    seed = params.stage_seed("reward")
    set_seed(seed)
    model = load_scalar_model(args.sft, tokenizer.pad_token_id)
    # resume checkpoints outside DVC's outs (DVC deletes those before a rerun), valid for this launch only
    checkpoints = ResumeCheckpoints.for_config(
        "reward",
        config,
        seed,
        args.preferences,
        args.sft,
        launch_part(accelerator),
        notify=checkpoint_events("reward"),
        processes=processes_of(accelerator),
    )
    checkpoints.open(unsupported=unsupported_resume(accelerator))
    log = TrainingLog("reward", args.live, accelerator.is_main_process)
    try:
        model, metrics = train_reward_model(
            model, tokenizer, config, seed, splits["train"], splits["eval"], accelerator, log, checkpoints
        )
    except NonFiniteError as error:
        fail(f"{error}; {checkpoints.kept()}", code=EXIT_DIVERGED)
    if accelerator.is_main_process:
        save_reward_model(model, tokenizer, args, samples, splits, metrics)
        metrics.update(world_size=accelerator.num_processes, distributed_type=accelerator.distributed_type.value)
        write_json(args.metrics, metrics)
    accelerator.wait_for_everyone()
    checkpoints.clear()  # the final model is in place: resume state no longer needed
    if accelerator.is_main_process:
        emit("reward", "metrics", **metrics)
    end_stage(accelerator)  # several processes: exits here, past a teardown that can deadlock


def save_reward_model(model, tokenizer, args, samples: list[dict], splits: dict, metrics: dict) -> None:
    """Normalise the scores (SFT samples: mean 0, std 1; Ziegler et al. 2019; the reference answers when there are
    no samples), write models/reward and add the data and normalisation figures to ``metrics``."""
    if samples:
        pairs = [(r["prompt"], resp) for r in samples for resp in r["responses"]][:N_NORMALIZATION_SAMPLES]
    else:
        pairs = [(r["prompt"], r["chosen"]) for r in splits["train"][:N_NORMALIZATION_SAMPLES]]
    scores = raw_scores(model, tokenizer, [p for p, _ in pairs], [r for _, r in pairs])
    normalization = RewardNormalization(mean=float(scores.mean()), std=float(scores.std().clamp(min=1e-6)))
    with write_folder(args.out, needed=tensor_bytes(model.state_dict().values())) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        normalization.save(staging)
    agreement = annotator_agreement(splits["eval"])
    metrics.update(
        {
            "n_train_pairs": len(splits["train"]),
            "n_eval_pairs": len(splits["eval"]),
            "annotator_agreement": agreement,
            "accuracy_vs_annotator": metrics["accuracy"] / agreement if agreement else None,
            "normalization_mean": normalization.mean,
            "normalization_std": normalization.std,
        }
    )


if __name__ == "__main__":
    main()
