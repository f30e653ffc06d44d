"""Model card: model-index numbers copied from the metrics, lineage (as pipeline/lineage.py reads it) as a table."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard

from rlhf.card import build_model_card

EVALUATION = {
    "gold_win_rate": 0.8125,
    "gold_win_rate_ci_low": 0.71,
    "gold_win_rate_ci_high": 0.9,
    "rm_score_policy": 1.25,
    "kl_to_ref": 3.5,
    "valid_rate_policy": 0.96875,
    "n_samples": 32,
    "kl_in_target_band": True,
}
LINEAGE = {
    "ppo": {"deps": {"models/sft": "aaa.dir", "tasks/ppo.py": "bbb"}, "outs": {"models/policy": "ccc.dir"}},
    "evaluate": {"deps": {"models/policy": "ccc.dir"}, "outs": {}},
    "missing": {"deps": {}, "outs": {}},
}


def card_for(tmp_path: Path) -> ModelCard:
    card = build_model_card(
        model_name="tiny",
        license="apache-2.0",
        language="en",
        base_model="gpt2",
        datasets=["embedded"],
        evaluation=EVALUATION,
        reward={"accuracy": 0.75},
        ppo={"iterations": 2},
        params={"seed": 0},
        git_commit="0123abc",
        lineage=LINEAGE,
        samples_markdown="| prompt |\n",
        overoptimization=[{"step": "0", "rm_score": "0.5", "gold_score": "0.25", "kl": "0.0"}],
        plots=["ppo_training.png", "overoptimization.png"],
    )
    card.save(tmp_path / "README.md")
    return ModelCard.load(tmp_path / "README.md")


def test_card_model_index_quotes_the_evaluation_metrics(tmp_path: Path) -> None:
    card = card_for(tmp_path)
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    # every numeric metric of the model-index list present in evaluate.json, value for value;
    # booleans and counts left out
    assert results == {
        k: EVALUATION[k]
        for k in (
            "gold_win_rate",
            "gold_win_rate_ci_low",
            "gold_win_rate_ci_high",
            "rm_score_policy",
            "kl_to_ref",
            "valid_rate_policy",
        )
    }
    assert {r.task_type for r in card.data.eval_results} == {"text-generation"}
    assert {"rlhf", "ppo"} <= set(card.data.tags) and card.data.base_model == "gpt2"


def test_card_body_has_lineage_plots_and_sections(tmp_path: Path) -> None:
    text = card_for(tmp_path).text
    assert (
        "`0123abc`" in text
        and "| ppo | dep | `models/sft` | `aaa.dir` |" in text
        and "| ppo | out | `models/policy` | `ccc.dir` |" in text
    )
    assert "![ppo_training.png](ppo_training.png)" in text and "![overoptimization.png](overoptimization.png)" in text
    assert "| 0 | 0.5 | 0.25 | 0 |" in text  # the over-optimisation table, from the CSV
    assert "0.71–0.9" in text  # the interval in the summary, from evaluate.json
    for heading in ("## Training parameters", "## Lineage", "## How to load and generate", "## Limitations"):
        assert heading in text


def test_card_without_lineage_says_it_was_not_built_by_dvc(tmp_path: Path) -> None:
    card = build_model_card(
        model_name="tiny",
        license="apache-2.0",
        language="en",
        base_model="embedded",
        datasets=["embedded"],
        evaluation={},
        reward={},
        ppo={},
        params={},
        git_commit="unknown",
        lineage={},
        samples_markdown="",
    )
    assert "- no `dvc.lock`: this folder was not built by `dvc repro`" in card.text
