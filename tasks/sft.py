"""Stage `sft`: supervised fine-tuning of the base model on demonstrations (loss on response tokens).

python -m tasks.sft --base models/base --data data/sft --out models/sft --metrics metrics/sft.json
"""

from __future__ import annotations

from rlhf import data
from rlhf.checkpoint import ResumeCheckpoints
from rlhf.files import replace_folder, staging_folder, write_json
from rlhf.guards import NonFiniteError
from rlhf.modeling import load_policy, load_tokenizer, max_positions, set_seed
from rlhf.params import load_params
from rlhf.training import train_sft
from rlhf.validation import check_model_dir, check_tokenizer_fits_model, read_records
from tasks.stage_io import EXIT_DIVERGED, checkpoint_events, emit, fail, parse_paths, progress_logger, refuse_bad_input


def main(argv: list[str] | None = None) -> None:
    args = parse_paths(argv, "python -m tasks.sft", "base data out metrics")
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
    # resume checkpoints outside DVC's outs (DVC deletes those before a rerun): rlhf/checkpoint.py
    checkpoints = ResumeCheckpoints.for_config(
        "sft", params.sft, seed, args.data, args.base, notify=checkpoint_events("sft")
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
