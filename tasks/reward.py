"""Stage `reward`: Bradley–Terry reward model, initialised from the SFT model, scores normalised on SFT samples.

    python -m tasks.reward
"""

from __future__ import annotations

import statistics
from pathlib import Path

from rlhf import data
from rlhf.config import ConfigError, load_params
from rlhf.data import DataError
from rlhf.modeling import RewardNormalization, load_scalar_model, load_tokenizer, set_seed
from rlhf.stage import emit, fail, progress_logger, replace_folder, staging_folder
from rlhf.training import raw_scores, train_reward_model

SFT_MODEL, PREFS, SAMPLES, OUT_DIR = Path("models/sft"), Path("data/preferences"), Path("data/pairs/samples.jsonl"), Path("models/reward")
METRICS = Path("metrics/reward.json")
N_NORMALIZATION_SAMPLES = 2048


def annotator_agreement(rows: list[dict]) -> float | None:
    """The annotator's own agreement with its noiseless gold on these pairs (ties half), when labels carry it."""
    margins = [row["gold_margin"] for row in rows if "gold_margin" in row]
    if not margins or len(margins) != len(rows):
        return None
    return statistics.fmean(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)


def main() -> None:
    try:
        params = load_params()
        config = params.reward
        tokenizer = load_tokenizer(SFT_MODEL)
        splits = {}
        for split in ("train", "eval"):
            path = PREFS / f"{split}.jsonl"
            rows = data.read_jsonl(path)
            data.validate_preferences(rows, str(path))
            for side in ("chosen", "rejected"):
                texts = [r["prompt"] + r[side] for r in rows]
                data.check_lengths(texts, tokenizer, config.max_length - 1, str(path), f"prompt + {side}")
            splits[split] = rows
        samples = data.read_jsonl(SAMPLES) if SAMPLES.exists() else []
    except (ConfigError, DataError) as error:
        fail(str(error))
    set_seed(params.seed + 3)
    model = load_scalar_model(SFT_MODEL, tokenizer.pad_token_id)
    metrics = train_reward_model(model, tokenizer, splits["train"], splits["eval"], config, params.seed + 3, progress_logger("reward"))
    # normalise: SFT samples score mean 0, std 1 (Ziegler et al. 2019); reference answers when there are no samples
    if samples:
        pairs = [(r["prompt"], resp) for r in samples for resp in r["responses"]][:N_NORMALIZATION_SAMPLES]
    else:
        pairs = [(r["prompt"], r["chosen"]) for r in splits["train"][:N_NORMALIZATION_SAMPLES]]
    scores = raw_scores(model, tokenizer, [p for p, _ in pairs], [r for _, r in pairs])
    normalization = RewardNormalization(mean=float(scores.mean()), std=float(scores.std().clamp(min=1e-6)))
    staging = staging_folder(OUT_DIR)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    normalization.save(staging)
    replace_folder(staging, OUT_DIR)
    agreement = annotator_agreement(splits["eval"])
    metrics.update({
        "n_train_pairs": len(splits["train"]),
        "n_eval_pairs": len(splits["eval"]),
        "annotator_agreement": agreement,
        "accuracy_vs_annotator": metrics["accuracy"] / agreement if agreement else None,
        "normalization_mean": normalization.mean,
        "normalization_std": normalization.std,
    })
    data.write_json(METRICS, metrics)
    emit("reward", "metrics", **metrics)


if __name__ == "__main__":
    main()
