"""Stage `sft`: supervised fine-tuning of the base model on demonstrations (loss on response tokens).

python -m tasks.sft --base models/base --data data/sft --out models/sft --metrics metrics/sft.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlhf import data
from rlhf.checkpoint import ResumeCheckpoints, config_part
from rlhf.config import load_params
from rlhf.files import replace_folder, staging_folder, write_json
from rlhf.guards import NonFiniteError
from rlhf.modeling import load_policy, load_tokenizer, max_positions, set_seed
from rlhf.training import train_sft
from rlhf.validation import check_model_dir, check_tokenizer_fits_model, read_records
from tasks.stage_io import EXIT_DIVERGED, emit, fail, progress_logger, refuse_bad_input

BASE_DIR, SFT_DIR, OUT_DIR = Path("models/base"), Path("data/sft"), Path("models/sft")
METRICS = Path("metrics/sft.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The stage's input and output paths (dvc.yaml passes them; the defaults are the same paths)."""
    parser = argparse.ArgumentParser(prog="python -m tasks.sft", description="Stage sft: supervised fine-tuning.")
    parser.add_argument("--base", type=Path, default=BASE_DIR, help="base model folder (from prepare)")
    parser.add_argument("--data", type=Path, default=SFT_DIR, help="demonstrations folder: train.jsonl, eval.jsonl")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="SFT model folder written")
    parser.add_argument("--metrics", type=Path, default=METRICS, help="metrics JSON written")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with refuse_bad_input():  # cheap checks only: params, demonstrations, the base folder and its tokenizer
        params = load_params()
        train_rows = read_records(args.data / "train.jsonl", data.validate_demonstrations)
        eval_rows = read_records(args.data / "eval.jsonl", data.validate_demonstrations)
        check_model_dir(args.base)
        tokenizer = load_tokenizer(args.base)
        check_tokenizer_fits_model(tokenizer, args.base)
        limit = max_positions(args.base)
        if limit:
            texts = [r["prompt"] + r["response"] for r in train_rows]
            data.check_lengths(texts, tokenizer, limit - 1, str(args.data / "train.jsonl"), "demonstration")
    seed = params.stage_seed("sft")
    set_seed(seed)
    model = load_policy(args.base)
    # resume checkpoints outside DVC's outs, valid only for these params, seed and inputs (rlhf/checkpoint.py)
    checkpoints = ResumeCheckpoints.for_stage(
        "sft",
        params.sft.resume_every,
        config_part(params.sft),
        seed,
        args.data,
        args.base,
        notify=lambda event, fields: emit("sft", event, **fields),
    )
    try:
        metrics = train_sft(
            model, tokenizer, train_rows, eval_rows, params.sft, seed, progress_logger("sft"), checkpoints
        )
    except NonFiniteError as error:
        fail(f"{error}; {checkpoints.kept()}", code=EXIT_DIVERGED)
    staging = staging_folder(args.out)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    replace_folder(staging, args.out)
    write_json(args.metrics, metrics)
    checkpoints.clear()  # the final model is in place: resume state no longer needed
    emit("sft", "metrics", **metrics)


if __name__ == "__main__":
    main()
