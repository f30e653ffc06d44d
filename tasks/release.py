"""Stage `release`: a Hub-ready folder (safetensors weights, tokenizer, config, generation config, model card).

    python -m tasks.release
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from rlhf.card import build_model_card, lineage_from_lock, read_csv
from rlhf.config import as_dict, load_params
from rlhf.files import replace_folder, staging_folder
from tasks.stage_io import emit, refuse_bad_input
from rlhf.validation import check_model_dir, read_json_object

POLICY, OUT_DIR = Path("models/policy"), Path("models/release")
UPSTREAM = ["prepare", "sft", "sample_pairs", "label", "reward", "ppo", "evaluate"]
PLOTS = (Path("plots/ppo_training.png"), Path("plots/overoptimization.png"))  # copied next to the card
RELEASE_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    with refuse_bad_input():  # before the staging folder: params, the policy folder, the metrics the card quotes
        params = load_params()
        check_model_dir(POLICY)
        metrics = {name: read_json_object(Path(f"metrics/{name}.json")) for name in ("evaluate", "reward", "ppo")}
    staging = staging_folder(OUT_DIR)
    for path in POLICY.iterdir():
        if path.name in RELEASE_FILES or path.suffix in {".json", ".txt", ".model"}:
            shutil.copy2(path, staging / path.name)
    plots = [path.name for path in PLOTS if path.exists()]
    for path in PLOTS:
        if path.exists():
            shutil.copy2(path, staging / path.name)
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
        lineage=lineage_from_lock(Path("dvc.lock"), UPSTREAM),
        samples_markdown=Path("metrics/samples.md").read_text() if Path("metrics/samples.md").exists() else "",
        overoptimization=read_csv(Path("plots/overoptimization.csv")),
        plots=plots,
    )
    card.save(staging / "README.md")
    replace_folder(staging, OUT_DIR)
    emit("release", "metrics", files=sorted(p.name for p in OUT_DIR.iterdir()))


if __name__ == "__main__":
    main()
