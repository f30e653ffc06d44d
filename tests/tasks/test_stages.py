"""One test (or a few) per stage program, on the tiny pipeline run once by the `pipeline_workspace` fixture."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from support import run_stage, tiny_params, write_params

from rlhf import data
from rlhf.files import path_digest, write_jsonl
from rlhf.modeling import RewardNormalization, load_scalar_model, load_tokenizer
from rlhf.training import raw_scores


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def set_params(folder: Path, **sections: dict) -> None:
    params = yaml.safe_load((folder / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    write_params(folder, params)


# ---------------------------------------------------------------------------------------------------------- prepare


def test_prepare_writes_corpus_tokenizer_and_model(pipeline_workspace: Path) -> None:
    metrics = read_json(pipeline_workspace / "metrics/prepare.json")
    assert metrics["n_prompts_train"] == 64 and metrics["n_prompts_eval"] == 16
    assert len(data.read_jsonl(pipeline_workspace / "data/prompts/train.jsonl")) == 64
    tokenizer = load_tokenizer(pipeline_workspace / "models/base")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    config = read_json(pipeline_workspace / "models/base/config.json")
    assert (config["n_layer"], config["n_embd"], config["n_positions"]) == (2, 32, 64)
    eval_prompts = {r["prompt"] for r in data.read_jsonl(pipeline_workspace / "data/prompts/eval.jsonl")}
    assert eval_prompts, "held-out prompts exist"


@pytest.fixture
def real_sources(pipeline_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty workspace whose base model is a local save_pretrained folder, as a Hub download would be."""
    local_model = tmp_path / "local-gpt2"
    shutil.copytree(pipeline_workspace / "models/sft", local_model)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    params = tiny_params()
    # the embedded corpus sizes and model shape have no effect with a real model and dataset: their defaults
    params["prepare"] = {"base_model": str(local_model), "max_prompt_tokens": 40}
    write_params(workspace, params)
    monkeypatch.chdir(workspace)
    return workspace


def hh_row(question: str, good: str, bad: str) -> dict:
    return {
        "chosen": f"\n\nHuman: {question}\n\nAssistant: {good}",
        "rejected": f"\n\nHuman: {question}\n\nAssistant: {bad}",
    }


def test_prepare_loads_a_real_model_and_an_hh_rlhf_dataset(real_sources: Path) -> None:
    rows = [hh_row(f"was the plot good {i}", "the plot was lovely .", "the plot was dull .") for i in range(20)]
    write_jsonl(real_sources / "hh.jsonl", rows)
    set_params(real_sources, prepare={"dataset": str(real_sources / "hh.jsonl"), "eval_fraction": 0.2})
    run_stage("prepare")
    train = data.read_jsonl(real_sources / "data/sft/train.jsonl")
    assert len(train) == 16 and len(data.read_jsonl(real_sources / "data/sft/eval.jsonl")) == 4
    assert train[0]["prompt"].endswith("\n\nAssistant:") and train[0]["response"] == " the plot was lovely ."
    assert (real_sources / "models/base/model.safetensors").exists()


def test_prepare_rejects_a_prompt_longer_than_allowed_before_loading_the_model(real_sources: Path, capsys) -> None:
    rows = [{"prompt": "the plot was", "response": " lovely ."}] * 10 + [
        {"prompt": "the plot was " * 30, "response": " dull ."}
    ]
    write_jsonl(real_sources / "demos.jsonl", rows)
    set_params(real_sources, prepare={"dataset": str(real_sources / "demos.jsonl"), "eval_fraction": 0.5})
    with pytest.raises(SystemExit):
        run_stage("prepare")
    message = capsys.readouterr().err
    assert "demos.jsonl" in message and "longer" in message or "more than" in message
    assert not (real_sources / "models/base").exists() and not (real_sources / "data/sft").exists()


def test_prepare_names_the_missing_column(real_sources: Path, capsys) -> None:
    write_jsonl(real_sources / "qa.jsonl", [{"question": "q", "answer": "a"}] * 4)
    set_params(real_sources, prepare={"dataset": str(real_sources / "qa.jsonl")})
    with pytest.raises(SystemExit):
        run_stage("prepare")
    message = capsys.readouterr().err
    assert "qa.jsonl" in message and "question" in message


# -------------------------------------------------------------------------------------------------- sft, sampling


def test_sft_lowers_held_out_loss(pipeline_workspace: Path) -> None:
    metrics = read_json(pipeline_workspace / "metrics/sft.json")
    assert metrics["eval_loss"] < 0.8 * metrics["eval_loss_initial"]


def test_sample_pairs_draws_k_responses_per_prompt(pipeline_workspace: Path) -> None:
    rows = data.read_jsonl(pipeline_workspace / "data/pairs/samples.jsonl")
    assert len(rows) == 48
    assert all(len(r["responses"]) == 3 and len(r["finished"]) == 3 for r in rows)
    assert [r["prompt_id"] for r in rows] == list(range(48))


# ------------------------------------------------------------------------------------------------------------ label


def test_label_simulated_labels_every_distinct_pair_and_splits_by_prompt(pipeline_workspace: Path) -> None:
    samples = data.read_jsonl(pipeline_workspace / "data/pairs/samples.jsonl")
    expected = sum(len(set(r["responses"])) * (len(set(r["responses"])) - 1) // 2 for r in samples)
    train = data.read_jsonl(pipeline_workspace / "data/preferences/train.jsonl")
    held_out = data.read_jsonl(pipeline_workspace / "data/preferences/eval.jsonl")
    assert len(train) + len(held_out) == expected
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert all(r["chosen"] != r["rejected"] and r["annotator"].startswith("simulated") for r in train)
    metrics = read_json(pipeline_workspace / "metrics/label.json")
    assert metrics["n_pairs"] == expected and 0.0 <= metrics["agreement_with_gold"] <= 1.0


def test_label_imports_an_ultrafeedback_style_dataset(in_copy_of_workspace: Path) -> None:
    def conversation(answer: str) -> list[dict]:
        return [{"role": "user", "content": "review the film"}, {"role": "assistant", "content": answer}]

    rows = [
        {
            "prompt": "review the film",
            "chosen": conversation(f"great {i}"),
            "rejected": conversation(f"bad {i}"),
            "score_chosen": 9.0,
            "score_rejected": 2.0,
        }
        for i in range(30)
    ]
    write_jsonl(in_copy_of_workspace / "uf.jsonl", rows)
    set_params(in_copy_of_workspace, label={"annotator": "dataset", "dataset": str(in_copy_of_workspace / "uf.jsonl")})
    run_stage("label")
    records = data.read_jsonl(in_copy_of_workspace / "data/preferences/train.jsonl") + data.read_jsonl(
        in_copy_of_workspace / "data/preferences/eval.jsonl"
    )
    assert len(records) == 30
    record = next(r for r in records if r["chosen"].endswith("great 0"))
    assert record["prompt"] == "\n\nHuman: review the film\n\nAssistant:" and record["rejected"] == " bad 0"


# ----------------------------------------------------------------------------------------------------------- reward


def test_reward_rejects_a_malformed_preference_file_without_touching_the_model(
    in_copy_of_workspace: Path, capsys
) -> None:
    before = path_digest(in_copy_of_workspace / "models/reward")
    path = in_copy_of_workspace / "data/preferences/train.jsonl"
    path.write_text(path.read_text() + '{"prompt": "the plot was", "chosen": \n')
    with pytest.raises(SystemExit):
        run_stage("reward")
    message = capsys.readouterr().err
    assert "data/preferences/train.jsonl" in message and "line" in message
    assert path_digest(in_copy_of_workspace / "models/reward") == before


def test_reward_rejects_preferences_missing_a_field(in_copy_of_workspace: Path, capsys) -> None:
    path = in_copy_of_workspace / "data/preferences/eval.jsonl"
    write_jsonl(path, [{"prompt": "the plot was", "chosen": " lovely ."}])
    with pytest.raises(SystemExit):
        run_stage("reward")
    message = capsys.readouterr().err
    assert "data/preferences/eval.jsonl" in message and "rejected" in message


def test_reward_scores_are_normalised_on_sft_samples(pipeline_workspace: Path) -> None:
    metrics = read_json(pipeline_workspace / "metrics/reward.json")
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n_eval_pairs"] > 0
    folder = pipeline_workspace / "models/reward"
    tokenizer = load_tokenizer(folder)
    model = load_scalar_model(folder, tokenizer.pad_token_id).eval()
    samples = data.read_jsonl(pipeline_workspace / "data/pairs/samples.jsonl")
    pairs = [(r["prompt"], x) for r in samples for x in r["responses"]]
    scores = RewardNormalization.load(folder).apply(
        raw_scores(model, tokenizer, [p for p, _ in pairs], [x for _, x in pairs])
    )
    assert abs(float(scores.mean())) < 1e-3 and abs(float(scores.std()) - 1.0) < 1e-3


# -------------------------------------------------------------------------------------------------------------- ppo


def test_ppo_updates_the_policy_and_logs_the_usual_metrics(pipeline_workspace: Path) -> None:
    metrics = read_json(pipeline_workspace / "metrics/ppo.json")
    assert metrics["iterations"] == 2 and metrics["episodes"] == 32 and metrics["world_size"] == 1
    with (pipeline_workspace / "plots/ppo.csv").open() as handle:
        history = list(csv.DictReader(handle))
    assert [row["step"] for row in history] == ["1", "2"]
    for name in (
        "objective/kl",
        "objective/scores",
        "objective/rlhf_reward",
        "ppo/policy/approxkl",
        "ppo/policy/clipfrac",
        "ppo/val/clipfrac",
        "ppo/loss/policy",
        "ppo/loss/value",
        "ppo/policy/entropy",
        "timing/rollout",
    ):
        assert name in history[0]
    # adaptive controller moved β after the first iteration
    assert float(history[1]["objective/kl_coef"]) != float(history[0]["objective/kl_coef"])
    policy = load_file(pipeline_workspace / "models/policy/model.safetensors")
    sft = load_file(pipeline_workspace / "models/sft/model.safetensors")
    assert policy.keys() == sft.keys()
    assert any(not torch.equal(policy[k], sft[k]) for k in policy)


def test_snapshot_steps_are_every_n_iterations_and_the_last() -> None:
    from rlhf.config import PPOConfig
    from rlhf.ppo_trainer.snapshots import snapshot_steps

    assert snapshot_steps(PPOConfig(iterations=60, snapshot_every=15)) == {15, 30, 45, 60}
    assert snapshot_steps(PPOConfig(iterations=60, snapshot_every=25)) == {25, 50, 60}
    assert snapshot_steps(PPOConfig(iterations=60, snapshot_every=0)) == {60}  # 0 = only the final policy


def test_ppo_saves_a_policy_snapshot_every_snapshot_every_iterations(pipeline_workspace: Path) -> None:
    # tiny params: 2 iterations, snapshot_every 1 → step-1 and step-2; the last is the final policy
    folder = pipeline_workspace / "models/policy_checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-1", "step-2"]
    final = load_file(pipeline_workspace / "models/policy/model.safetensors")
    last, first = load_file(folder / "step-2/model.safetensors"), load_file(folder / "step-1/model.safetensors")
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert any(not torch.equal(first[k], last[k]) for k in final)
    assert (folder / "step-1/tokenizer.json").exists() and (folder / "step-1/generation_config.json").exists()


# --------------------------------------------------------------------------------------------------------- evaluate


def test_evaluate_reports_proxy_and_gold_side_by_side(pipeline_workspace: Path) -> None:
    metrics = read_json(pipeline_workspace / "metrics/evaluate.json")
    for name in (
        "gold_win_rate",
        "gold_score_policy",
        "gold_score_sft",
        "rm_score_policy",
        "rm_score_sft",
        "kl_to_ref",
        "valid_rate_policy",
        "valid_rate_sft",
        "n_prompts",
        "distinct_policy",
        "response_length_policy",
    ):
        assert name in metrics
    assert metrics["n_samples"] == 16 and 0.0 <= metrics["gold_win_rate"] <= 1.0
    assert metrics["gold_win_rate_ci_low"] <= metrics["gold_win_rate"] <= metrics["gold_win_rate_ci_high"]
    for name in ("distinct_1_policy", "distinct_2_policy", "repetition_rate_policy", "repetition_rate_sft"):
        assert 0.0 <= metrics[name] <= 1.0
    table = (pipeline_workspace / "metrics/samples.md").read_text()
    assert table.count("\n| ") >= 12  # header + 12 sample rows (n_samples_table)


def test_evaluate_scores_every_checkpoint_for_the_overoptimization_curve(pipeline_workspace: Path) -> None:
    with (pipeline_workspace / "plots/overoptimization.csv").open() as handle:
        curve = list(csv.DictReader(handle))
    # step 0 is the SFT policy (KL 0 to itself), then each saved checkpoint
    assert [row["step"] for row in curve] == ["0", "1", "2"]
    assert {"rm_score", "gold_score", "kl", "valid_rate"} <= set(curve[0])
    assert abs(float(curve[0]["kl"])) < 1e-6
    for name in ("plots/ppo_training.png", "plots/overoptimization.png"):
        assert (pipeline_workspace / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_of_the_sft_policy_against_itself_is_a_tie_with_zero_kl(in_copy_of_workspace: Path) -> None:
    shutil.rmtree(in_copy_of_workspace / "models/policy")
    shutil.copytree(in_copy_of_workspace / "models/sft", in_copy_of_workspace / "models/policy")
    run_stage("evaluate")
    metrics = read_json(in_copy_of_workspace / "metrics/evaluate.json")
    assert metrics["gold_win_rate"] == 0.5 and metrics["rm_win_rate"] == 0.5
    assert abs(metrics["kl_to_ref"]) < 1e-6
    assert metrics["gold_score_policy"] == metrics["gold_score_sft"]


# ---------------------------------------------------------------------------------------------------------- release


def test_release_folder_is_loadable_and_its_card_quotes_the_metrics(pipeline_workspace: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = pipeline_workspace / "models/release"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= {
        p.name for p in folder.iterdir()
    }
    card = (folder / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    assert {"rlhf", "ppo"} <= set(front_matter["tags"])
    evaluation = read_json(pipeline_workspace / "metrics/evaluate.json")
    assert f"| gold_win_rate | {evaluation['gold_win_rate']:.4g} |" in card
    assert "git commit" in card and "## Limitations" in card and "## How to load and generate" in card
    # the model-index is evaluate.json, number for number
    model_index = front_matter["model-index"][0]["results"][0]
    assert model_index["task"]["type"] == "text-generation"
    published = {m["type"]: m["value"] for m in model_index["metrics"]}
    assert {
        "gold_win_rate",
        "gold_win_rate_ci_low",
        "gold_win_rate_ci_high",
        "rm_score_policy",
        "kl_to_ref",
        "valid_rate_policy",
    } <= set(published)
    assert all(published[name] == evaluation[name] for name in published)
    # the plots travel with the card
    for name in ("ppo_training.png", "overoptimization.png"):
        assert (folder / name).exists() and f"]({name})" in card
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    inputs = tokenizer("the plot was", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_ppo_refuses_a_prompt_that_leaves_no_room_to_answer_before_training(in_copy_of_workspace: Path, capsys) -> None:
    before = path_digest(in_copy_of_workspace / "models/policy")
    path = in_copy_of_workspace / "data/prompts/train.jsonl"
    rows = data.read_jsonl(path)
    write_jsonl(path, rows + [{"prompt": "the plot was lovely and " * 12 + "the plot was"}])
    with pytest.raises(SystemExit):
        run_stage("ppo")
    message = capsys.readouterr().err
    assert "data/prompts/train.jsonl" in message and f"row {len(rows)}" in message
    assert path_digest(in_copy_of_workspace / "models/policy") == before
