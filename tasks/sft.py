"""Stage `sft`: supervised fine-tuning of the base model on demonstrations (loss on response tokens).

    python -m tasks.sft
"""

from __future__ import annotations

from pathlib import Path

from rlhf import data
from rlhf.checkpoint import Checkpointer, config_part
from rlhf.config import load_params
from rlhf.guards import NonFiniteError
from rlhf.modeling import load_policy, max_positions, load_tokenizer, set_seed
from rlhf.files import replace_folder, staging_folder
from tasks.stage_io import EXIT_DIVERGED, emit, fail, progress_logger, refuse_bad_input
from rlhf.training import train_sft
from rlhf.validation import check_model_dir, check_tokenizer_fits_model, read_records

BASE_DIR, SFT_DIR, OUT_DIR = Path("models/base"), Path("data/sft"), Path("models/sft")
METRICS = Path("metrics/sft.json")


def main() -> None:
    with refuse_bad_input():  # cheap checks only: params, demonstrations, the base folder and its tokenizer
        params = load_params()
        train_rows = read_records(SFT_DIR / "train.jsonl", data.validate_demonstrations)
        eval_rows = read_records(SFT_DIR / "eval.jsonl", data.validate_demonstrations)
        check_model_dir(BASE_DIR)
        tokenizer = load_tokenizer(BASE_DIR)
        check_tokenizer_fits_model(tokenizer, BASE_DIR)
        limit = max_positions(BASE_DIR)
        if limit:
            texts = [r["prompt"] + r["response"] for r in train_rows]
            data.check_lengths(texts, tokenizer, limit - 1, str(SFT_DIR / "train.jsonl"), "demonstration")
    set_seed(params.seed)
    model = load_policy(BASE_DIR)
    # resume checkpoints outside DVC's outs, valid only for these params, seed and inputs (rlhf/checkpoint.py)
    checkpoints = Checkpointer.for_stage("sft", params.sft.checkpoint_every, config_part(params.sft), params.seed, SFT_DIR, BASE_DIR,
                                         notify=lambda event, fields: emit("sft", event, **fields))
    try:
        metrics = train_sft(model, tokenizer, train_rows, eval_rows, params.sft, params.seed, progress_logger("sft"), checkpoints)
    except NonFiniteError as error:
        fail(f"{error}; {checkpoints.kept()}", code=EXIT_DIVERGED)
    staging = staging_folder(OUT_DIR)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    replace_folder(staging, OUT_DIR)
    data.write_json(METRICS, metrics)
    checkpoints.clear()  # the final model is in place: resume state no longer needed
    emit("sft", "metrics", **metrics)


if __name__ == "__main__":
    main()
