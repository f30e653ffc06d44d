"""Stage `label`: preference labels → data/preferences/{train,eval}.jsonl.

    python -m tasks.label --pairs data/pairs --base models/base --out data/preferences --metrics metrics/label.json

Annotators (`label.annotator`):
- `simulated`: a gold judge (`label.gold`, `module:callable`) plus Bradley–Terry noise labels all pairs of the
  sampled responses of each prompt;
- `dataset`: imports public preference data (hh-rlhf `chosen`/`rejected` transcripts, `prompt`/`chosen`/`rejected`,
  or conversational message lists as in UltraFeedback-binarized) instead of the sampled pairs, rendered as `prepare`
  renders prompts and demonstrations: with the chat template of the tokenizer in models/base when it has one
  (only the tokenizer is loaded, never weights), else in the hh-rlhf text format;
- `human`: reads the labels people gave through the labelling flow (`label.labels_file`).
The simulated and human annotators label responses sampled from the policy for prompts `prepare` already rendered,
so they need no renderer. The split into train/eval is by prompt, so no prompt's pairs sit on both sides.
"""

from __future__ import annotations

import random
from pathlib import Path

from rlhf import annotators, data, importers
from rlhf.config import LabelConfig
from rlhf.data import DataError
from rlhf.files import write_json, write_jsonl
from rlhf.params import load_params
from rlhf.validation import check_model_dir, finite_scores, load_judge, read_records
from tasks.stage_io import emit, parse_paths, refuse_bad_input, reports_full_disk, start_events


def split_by_prompt(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic split keeping all pairs of a prompt on one side (by row when there is a single prompt)."""
    prompts = sorted({row["prompt"] for row in rows})
    if len(prompts) < 2:
        return data.split_train_eval(rows, eval_fraction, seed)
    random.Random(seed).shuffle(prompts)
    n_eval = max(1, round(len(prompts) * eval_fraction))
    held_out = set(prompts[:n_eval])
    return [r for r in rows if r["prompt"] not in held_out], [r for r in rows if r["prompt"] in held_out]


def label_simulated(config: LabelConfig, seed: int, samples_file: Path) -> tuple[list[dict], dict]:
    samples = read_records(samples_file, data.validate_samples)
    load_judge(config.gold, "label.gold")  # a bad spec is named as a params key
    annotator = annotators.make_annotator(config.gold, config.temperature, config.flip_prob, seed)
    # the gold judge is user code: score everything first and refuse a NaN/inf score, naming the row
    annotator.gold = finite_scores(annotator.gold, samples, str(samples_file), f"label.gold {config.gold!r}")
    annotator_id = f"simulated:{config.gold}:tau={config.temperature}:flip={config.flip_prob}"
    return annotators.label_pairs(samples, annotator, annotator_id)


def base_renderer(base: Path) -> importers.Renderer:
    """The renderer `prepare` used: from the tokenizer saved in models/base (its chat template, else hh-rlhf text)."""
    from rlhf.modeling import load_tokenizer  # here: only this annotator needs it, and it imports torch (slow)

    check_model_dir(base)
    tokenizer = load_tokenizer(base)
    render = importers.renderer_for(tokenizer)
    end_of_turn = getattr(render, "end_of_turn", "")
    if end_of_turn and tokenizer.eos_token != end_of_turn:  # prepare sets it; a hand-edited folder may not have it
        raise DataError(
            f"{base}: the tokenizer's EOS {tokenizer.eos_token!r} is not its chat template's end-of-turn token "
            f"{end_of_turn!r}, so imported responses would not end as the policy's do"
        )
    return render


def label_from_dataset(config: LabelConfig, render: importers.Renderer) -> tuple[list[dict], dict]:
    rows = importers.load_table(config.dataset, config.dataset_split)
    rows = rows[: config.max_rows] if config.max_rows else rows
    records, n_dropped = importers.to_preference_records(rows, config.dataset, render)
    annotator = f"dataset:{config.dataset}"  # one string shared by every record (1 M copies cost 0.1 GiB)
    for record in records:
        record["annotator"] = annotator
    return records, {"n_pairs": len(records), "n_dropped": n_dropped}


def label_from_humans(config: LabelConfig) -> tuple[list[dict], dict]:
    path = Path(config.labels_file)
    if not path.exists():
        raise DataError(f"{path}: no human labels yet. Fix: collect some with the labelling flow (`rlhf label`)")
    records = read_records(path, data.validate_preferences)
    return records, {"n_pairs": len(records), "n_annotators": len({r.get("annotator") for r in records})}


@reports_full_disk("label")  # a full disk: one line, exit 4 (tasks/stage_io.py)
def main(argv: list[str] | None = None) -> None:
    start_events("label")  # this run's events only (.rlhf/logs/label.jsonl)
    args = parse_paths(argv, "python -m tasks.label", "pairs base out metrics")
    with refuse_bad_input():  # labelling is cheap: all of it runs before anything is written
        params = load_params()
        config = params.label
        if config.annotator == "simulated":
            records, stats = label_simulated(config, params.stage_seed("label.annotator"), args.pairs / "samples.jsonl")
        elif config.annotator == "dataset":
            records, stats = label_from_dataset(config, base_renderer(args.base))
        else:
            records, stats = label_from_humans(config)
        data.validate_preferences(records, f"labels from the {config.annotator} annotator")
        train, held_out = split_by_prompt(records, config.eval_fraction, params.stage_seed("label.split"))
        if not train or not held_out:
            raise DataError(
                f"{config.annotator} annotator: {len(records)} preference pairs are too few to split into train "
                "and eval. Fix: provide more pairs (or change label.eval_fraction in params.yaml)"
            )
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", held_out)
    metrics = {**stats, "annotator": config.annotator, "n_train": len(train), "n_eval": len(held_out)}
    write_json(args.metrics, metrics)
    emit("label", "metrics", **metrics)


if __name__ == "__main__":
    main()
