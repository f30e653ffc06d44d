"""The release folder's model card: metadata, metrics, training parameters and lineage (all read from files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCardData


def lineage_from_lock(lock_path: Path, stages: list[str]) -> dict[str, dict[str, str]]:
    """Per stage: each output path → its DVC hash (md5), read from dvc.lock."""
    if not lock_path.exists():
        return {}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    lineage: dict[str, dict[str, str]] = {}
    for stage in stages:
        outs = lock.get("stages", {}).get(stage, {}).get("outs", [])
        lineage[stage] = {out["path"]: out.get("md5", "") for out in outs}
    return lineage


def _table(rows: list[tuple[str, Any]]) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return "| metric | value |\n|---|---|\n" + "\n".join(f"| {name} | {fmt(value)} |" for name, value in rows) + "\n"


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
    lineage: dict[str, dict[str, str]],
    samples_markdown: str,
) -> str:
    """README.md for the release folder: YAML front matter + sections."""
    metadata = ModelCardData(
        language=language,
        license=license,
        library_name="transformers",
        tags=["rlhf", "ppo", "rlhf-pipeline", "text-generation"],
        pipeline_tag="text-generation",
        base_model=None if base_model == "embedded" else base_model,
        datasets=[d for d in datasets if d != "embedded"] or None,
    )
    eval_rows = [(k, v) for k, v in evaluation.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    sections = [
        f"---\n{metadata.to_yaml()}\n---",
        f"# {model_name}",
        "A causal language model trained with PPO from human-preference feedback (RLHF) by "
        "[rlhf-pipeline](https://github.com/): SFT → preference pairs → Bradley–Terry reward model → PPO with a "
        "per-token KL penalty to the SFT policy. Every number below is copied from the pipeline's metrics files.",
        "## Evaluation (held-out prompts, PPO policy vs its SFT starting point)\n\n" + _table(eval_rows),
        "## Reward model\n\n" + _table([(k, v) for k, v in reward.items() if v is not None]),
        "## PPO training\n\n" + _table([(k, v) for k, v in ppo.items()]),
        "## How to use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        "tokenizer = AutoTokenizer.from_pretrained(\"PATH_OR_REPO\")\nmodel = AutoModelForCausalLM.from_pretrained(\"PATH_OR_REPO\")\n"
        "inputs = tokenizer(\"the plot was\", return_tensors=\"pt\")\n"
        "output = model.generate(**inputs)  # sampling settings come from generation_config.json\n"
        "print(tokenizer.decode(output[0], skip_special_tokens=True))\n```",
        "## Lineage\n\n"
        f"- git commit: `{git_commit}`\n"
        + "".join(f"- `{stage}` → " + ", ".join(f"`{path}` md5 `{md5}`" for path, md5 in outs.items()) + "\n" for stage, outs in lineage.items() if outs),
        "## Training parameters (params.yaml)\n\n```yaml\n" + yaml.safe_dump(params, sort_keys=False) + "```",
        "## Samples\n\n" + samples_markdown,
        "## Limitations\n\n"
        "- The reward model is a learned proxy of the annotator; PPO optimises the proxy, so compare the proxy (RM) and "
        "gold columns above: a rising RM score with a flat gold score is reward over-optimisation.\n"
        "- The embedded default is a toy review grammar with a simulated annotator: its numbers say the pipeline learns, "
        "not that the model is useful for anything else.\n"
        "- PPO narrows the output distribution (compare `distinct_policy` with `distinct_sft`).",
    ]
    return "\n\n".join(sections) + "\n"


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}
