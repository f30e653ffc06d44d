"""The release folder's model card: metadata, metrics, training parameters and lineage, all given as data.

The release stage (tasks/release.py) reads the metrics files, and the lineage from dvc.lock (pipeline/lineage.py).
"""

from __future__ import annotations

from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

# metrics/evaluate.json keys published in the card's model-index (those present are taken, in this order)
MODEL_INDEX_METRICS = (
    "gold_win_rate",
    "gold_win_rate_ci_low",
    "gold_win_rate_ci_high",
    "gold_score_policy",
    "gold_score_sft",
    "rm_win_rate",
    "rm_score_policy",
    "rm_score_sft",
    "kl_to_ref",
    "valid_rate_policy",
    "valid_rate_sft",
    "response_length_policy",
    "distinct_1_policy",
    "distinct_2_policy",
    "repetition_rate_policy",
)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(rows: list[tuple[str, Any]]) -> str:
    return "| metric | value |\n|---|---|\n" + "\n".join(f"| {name} | {_fmt(value)} |" for name, value in rows) + "\n"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


ALGORITHM_NAMES = {"ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO", "reinforce_pp": "REINFORCE++", "dpo": "DPO"}


def eval_results(evaluation: dict[str, Any], dataset: str) -> list[EvalResult]:
    """model-index entries (task text-generation) for the evaluation metrics, values copied from evaluate.json."""
    embedded = dataset == "embedded"
    common = dict(
        task_type="text-generation",
        task_name="RLHF policy vs its SFT start on held-out prompts",
        dataset_type="embedded" if embedded else dataset,
        dataset_name="rlhf-pipeline embedded reviews (held-out prompts)" if embedded else dataset,
        dataset_split="held-out",
    )
    return [
        EvalResult(metric_type=name, metric_name=name, metric_value=evaluation[name], **common)
        for name in MODEL_INDEX_METRICS
        if _is_number(evaluation.get(name))
    ]


def _lineage_markdown(git_commit: str, lineage: dict[str, dict[str, dict[str, str]]]) -> str:
    rows = [
        f"| {stage} | {kind[:-1]} | `{path}` | `{md5}` |"
        for stage, kinds in lineage.items()
        for kind, items in kinds.items()
        for path, md5 in items.items()
    ]
    text = f"- git commit: `{git_commit}`\n"
    if rows:
        text += (
            "- DVC hashes (md5, from `dvc.lock`) of every input and output of the stages upstream of this release:\n\n"
        )
        text += "| stage | dep/out | path | md5 |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    else:
        text += "- no `dvc.lock`: this folder was not built by `dvc repro`, so its inputs carry no DVC hashes.\n"
    return text


def _overoptimization_markdown(curve: list[dict[str, str]], plots: list[str]) -> str:
    text = (
        "Every saved PPO checkpoint (step 0 = the SFT policy) scored on the same held-out prompts "
        "(`plots/overoptimization.csv`). Reward over-optimisation shows as the RM (proxy) score still rising while the "
        "gold score stops rising or falls.\n\n"
    )
    if curve:
        columns = list(curve[0])
        text += "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"

        def cell(column: str, value: str) -> str:
            return value if column == "step" or value == "" else _fmt(float(value))

        text += "\n".join("| " + " | ".join(cell(c, row[c]) for c in columns) + " |" for row in curve) + "\n"
    for name in plots:
        text += f"\n![{name}]({name})\n"
    return text


def build_model_card(
    model_name: str,
    license: str,
    language: str,
    base_model: str,
    datasets: list[str],
    evaluation: dict[str, Any],
    reward: dict[str, Any],
    ppo: dict[str, Any],
    params: dict[str, Any],
    git_commit: str,
    lineage: dict[str, dict[str, dict[str, str]]],
    samples_markdown: str,
    overoptimization: list[dict[str, str]] | None = None,
    plots: list[str] | None = None,
) -> ModelCard:
    """The release folder's README.md: YAML metadata (incl. model-index) + sections, every number from a metrics file.

    ``plots``: PNG file names copied next to the card, referenced as images.
    """
    plots = plots or []
    algorithm = str(ppo.get("algorithm", "ppo"))
    name = ALGORITHM_NAMES.get(algorithm, algorithm)
    method = (
        "SFT → preference pairs → DPO on those preferences (offline, no reward model in the loop; the reward model "
        "trained beside it only scores the evaluation)"
        if algorithm == "dpo"
        else f"SFT → preference pairs → Bradley–Terry reward model → {name} with a KL penalty to the SFT policy"
    )
    metadata = ModelCardData(
        model_name=model_name,
        language=language,
        license=license,
        library_name="transformers",
        tags=["rlhf", *dict.fromkeys(["ppo", algorithm.replace("_", "-")]), "rlhf-pipeline", "text-generation"],
        pipeline_tag="text-generation",
        base_model=None if base_model == "embedded" else base_model,
        datasets=[d for d in datasets if d != "embedded"] or None,
        eval_results=eval_results(evaluation, datasets[0] if datasets else "embedded") or None,
    )
    eval_rows = [(k, v) for k, v in evaluation.items() if _is_number(v)]
    summary = ""
    if "gold_win_rate" in evaluation:
        interval = (
            f" (95 % bootstrap interval {_fmt(evaluation['gold_win_rate_ci_low'])}"
            f"–{_fmt(evaluation['gold_win_rate_ci_high'])})"
            if "gold_win_rate_ci_low" in evaluation
            else ""
        )
        summary = (
            f"Against its SFT starting point the policy wins {_fmt(evaluation['gold_win_rate'])} of paired comparisons "
            f"judged by the gold annotator{interval}, at a KL of {_fmt(evaluation.get('kl_to_ref'))} nats "
            "to the SFT policy.\n\n"
        )
    sections = [
        f"# {model_name}",
        f"A causal language model trained with {name} from human-preference feedback (RLHF) by "
        f"[rlhf-pipeline](https://github.com/): {method}. Every number below is copied from the pipeline's "
        "metrics files.",
        f"## Evaluation (held-out prompts, {name} policy vs its SFT starting point)\n\n"
        + summary
        + "Win rates count ties as half; their intervals resample prompts (percentile bootstrap). `distinct_n`: unique "
        "word n-grams / all word n-grams; `repetition_rate`: share of responses repeating a word bigram.\n\n"
        + _table(eval_rows),
        f"## Reward over-optimisation across {name} checkpoints\n\n"
        + _overoptimization_markdown(overoptimization or [], [p for p in plots if "overoptimization" in p]),
        "## Reward model\n\n" + _table([(k, v) for k, v in reward.items() if v is not None]),
        f"## {name} training\n\n"
        + _table(list(ppo.items()))
        + "".join(f"\n![{name}]({name})\n" for name in plots if "overoptimization" not in name),
        "## Training parameters (params.yaml)\n\n```yaml\n" + yaml.safe_dump(params, sort_keys=False) + "```",
        "## Lineage\n\n" + _lineage_markdown(git_commit, lineage),
        "## How to load and generate\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model_id = "PATH_OR_REPO"  # this folder, or the Hub repo it was uploaded to\n'
        "tokenizer = AutoTokenizer.from_pretrained(model_id)\nmodel = AutoModelForCausalLM.from_pretrained(model_id)\n"
        'inputs = tokenizer("the plot was", return_tensors="pt")\n'
        "output = model.generate(**inputs)  # sampling settings as in training come from generation_config.json\n"
        "print(tokenizer.decode(output[0], skip_special_tokens=True))\n```",
        "## Samples\n\n" + samples_markdown,
        "## Limitations\n\n"
        "- The reward model is a learned proxy of the annotator; PPO optimises the proxy, so compare the proxy "
        "(RM) and gold columns above: a rising RM score with a flat gold score is reward over-optimisation.\n"
        "- The embedded default is a toy review grammar with a simulated annotator: its numbers say the "
        "pipeline learns, not that the model is useful for anything else.\n"
        "- PPO narrows the output distribution (compare `distinct_*_policy` with `distinct_*_sft`).\n"
        "- Evaluation samples a few hundred held-out responses: read win rates with their bootstrap intervals.",
    ]
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
