"""Stage `sft`: supervised fine-tuning of the base model on demonstrations (loss on response tokens).

    python -m tasks.sft
"""

from __future__ import annotations

from pathlib import Path

from rlhf import data
from rlhf.config import ConfigError, load_params
from rlhf.data import DataError
from rlhf.modeling import load_policy, max_positions, load_tokenizer, set_seed
from rlhf.stage import emit, fail, progress_logger, replace_folder, staging_folder
from rlhf.training import train_sft

BASE_DIR, SFT_DIR, OUT_DIR = Path("models/base"), Path("data/sft"), Path("models/sft")
METRICS = Path("metrics/sft.json")


def main() -> None:
    try:
        params = load_params()
        train_rows = data.read_jsonl(SFT_DIR / "train.jsonl")
        eval_rows = data.read_jsonl(SFT_DIR / "eval.jsonl")
        data.validate_demonstrations(train_rows, str(SFT_DIR / "train.jsonl"))
        data.validate_demonstrations(eval_rows, str(SFT_DIR / "eval.jsonl"))
        tokenizer = load_tokenizer(BASE_DIR)
        limit = max_positions(BASE_DIR)
        if limit:
            texts = [r["prompt"] + r["response"] for r in train_rows]
            data.check_lengths(texts, tokenizer, limit - 1, str(SFT_DIR / "train.jsonl"), "demonstration")
    except (ConfigError, DataError) as error:
        fail(str(error))
    set_seed(params.seed)
    model = load_policy(BASE_DIR)
    metrics = train_sft(model, tokenizer, train_rows, eval_rows, params.sft, params.seed, progress_logger("sft"))
    staging = staging_folder(OUT_DIR)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    replace_folder(staging, OUT_DIR)
    data.write_json(METRICS, metrics)
    emit("sft", "metrics", **metrics)


if __name__ == "__main__":
    main()
