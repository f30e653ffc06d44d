"""Stage `release`: a Hub-ready folder (safetensors weights, tokenizer, config, generation config, model card).

    python -m tasks.release --policy models/policy --evaluate-metrics metrics/evaluate.json \
        --reward-metrics metrics/reward.json --ppo-metrics metrics/ppo.json --samples metrics/samples.md \
        --curve plots/overoptimization.csv --plots plots/ppo_training.png plots/overoptimization.png \
        --out models/release
"""

from __future__ import annotations

import shutil

from pipeline.lineage import LOCK_FILE, git_commit, stage_lineage
from pipeline.workspace import upstream_of
from rlhf.card import build_model_card
from rlhf.config import as_dict
from rlhf.files import read_csv, tree_size, write_folder
from rlhf.params import load_params
from rlhf.validation import check_model_dir, read_json_object
from tasks.stage_io import emit, parse_paths, refuse_bad_input, reports_full_disk, start_events

RELEASE_FILES = (
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


@reports_full_disk("release")  # a full disk: one line, exit 4 (tasks/stage_io.py)
def main(argv: list[str] | None = None) -> None:
    start_events("release")  # this run's events only (.rlhf/logs/release.jsonl)
    args = parse_paths(
        argv, "python -m tasks.release", "policy evaluate_metrics reward_metrics ppo_metrics samples curve plots+ out"
    )
    with refuse_bad_input():  # before the staging folder: params, the policy folder, the metrics the card quotes
        params = load_params()
        check_model_dir(args.policy)
        metrics = {name: read_json_object(getattr(args, f"{name}_metrics")) for name in ("evaluate", "reward", "ppo")}
    copied = [p for p in args.policy.iterdir() if p.name in RELEASE_FILES or p.suffix in {".json", ".txt", ".model"}]
    plots = [path for path in args.plots if path.exists()]
    card = build_model_card(
        model_name=params.release.model_name,
        license=params.release.license,
        language=params.release.language,
        base_model=params.prepare.base_model,
        datasets=[params.prepare.dataset] + ([params.label.dataset] if params.label.annotator == "dataset" else []),
        evaluation=metrics["evaluate"],
        reward=metrics["reward"],
        ppo=metrics["ppo"],
        params=as_dict(params),
        git_commit=git_commit(),
        lineage=stage_lineage(LOCK_FILE, upstream_of("release")),  # the stages before this one in dvc.yaml
        samples_markdown=args.samples.read_text() if args.samples.exists() else "",
        overoptimization=read_csv(args.curve),
        plots=[path.name for path in plots],
    )
    with write_folder(args.out, needed=sum(tree_size(path) for path in copied + plots)) as staging:
        for path in copied + plots:
            shutil.copy2(path, staging / path.name)
        card.save(staging / "README.md")
    emit("release", "metrics", files=sorted(p.name for p in args.out.iterdir()))


if __name__ == "__main__":
    main()
