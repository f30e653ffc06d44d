"""The `ppo` stage with ``ppo.algorithm: dpo``, run as dvc.yaml runs it (tasks.launch → accelerate launch →
tasks.ppo → tasks.dpo) on the tiny pipeline's SFT model and preference pairs: PPO's outputs in PPO's formats, a policy
that prefers the chosen responses, `evaluate` on top of it, the refusals, and 1 vs 2 processes."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from support import REPO, set_params, stage_command

from rlhf import data
from rlhf.dpo_training import DPO_STATS, dpo_examples, pair_logprobs
from rlhf.files import path_digest
from rlhf.modeling import causal_lm_logits, load_policy, load_tokenizer
from rlhf.training import TrainedForward
from tasks.stage_io import read_events

# 4 epochs of 16 pairs per step at a high learning rate for the 0.1 M-parameter tiny model (the tiny pipeline's
# ≈ 140 noisy simulated labels): ≈ 15 s, train-pair accuracy ≈ 0.79 (measured)
TINY_DPO = {"beta": 0.1, "batch_size": 16, "epochs": 4, "learning_rate": 0.005, "warmup_steps": 2, "snapshot_every": 16}
TWO_PROCESSES = {"config_file": "configs/cpu-2proc.yaml", "num_processes": 2}


def as_dpo(workspace: Path, **dpo) -> None:
    """ppo.algorithm: dpo with the tiny DPO settings; the RL keys back at their defaults (idle keys are refused)."""
    repo = yaml.safe_load((REPO / "params.yaml").read_text())
    set_params(workspace, ppo=dict(repo["ppo"], algorithm="dpo"), dpo={**repo["dpo"], **TINY_DPO, **dpo})


def copy_workspace(pipeline_workspace: Path, folder: Path) -> Path:
    """The tiny pipeline's workspace without PPO's outputs (so every DPO output must be written anew)."""
    shutil.copytree(pipeline_workspace, folder, ignore=shutil.ignore_patterns(".rlhf"))
    for output in ("models/policy", "models/policy_checkpoints", "models/release"):
        shutil.rmtree(folder / output, ignore_errors=True)
    for output in ("metrics/ppo.json", "plots/ppo.csv", "metrics/evaluate.json", "plots/overoptimization.csv"):
        (folder / output).unlink(missing_ok=True)
    return folder


def launch(stage: str, workspace: Path) -> subprocess.CompletedProcess:
    return subprocess.run(stage_command(stage, workspace), cwd=workspace, capture_output=True, text=True, timeout=600)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def dpo_workspace(pipeline_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny pipeline where the `ppo` stage ran once with ppo.algorithm: dpo."""
    workspace = copy_workspace(pipeline_workspace, tmp_path_factory.mktemp("dpo") / "workspace")
    as_dpo(workspace)
    result = launch("ppo", workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    return workspace


def expected_steps(workspace: Path) -> int:
    pairs = len(data.read_jsonl(workspace / "data/preferences/train.jsonl"))
    return pairs // TINY_DPO["batch_size"] * TINY_DPO["epochs"]  # the tail short of a batch is skipped each epoch


def expected_snapshots(steps: int) -> list[int]:
    """Every dpo.snapshot_every steps and the last."""
    return sorted({*range(TINY_DPO["snapshot_every"], steps + 1, TINY_DPO["snapshot_every"]), steps})


def test_dpo_writes_the_ppo_stage_outputs_in_their_formats(dpo_workspace: Path) -> None:
    steps = expected_steps(dpo_workspace)
    # models/policy: a causal LM with the SFT model's tensors (changed) and tokenizer, and a sampling config
    policy = load_file(dpo_workspace / "models/policy/model.safetensors")
    sft = load_file(dpo_workspace / "models/sft/model.safetensors")
    assert policy.keys() == sft.keys() and any(not torch.equal(policy[k], sft[k]) for k in policy)
    generation = read_json(dpo_workspace / "models/policy/generation_config.json")
    eos = load_tokenizer(dpo_workspace / "models/sft").eos_token_id
    assert generation["do_sample"] is True and generation["eos_token_id"] == eos
    # snapshots as PolicySnapshots writes them: step-N every dpo.snapshot_every steps and the last (= the policy)
    snapshots = dpo_workspace / "models/policy_checkpoints"
    expected = expected_snapshots(steps)
    assert sorted(int(p.name.removeprefix("step-")) for p in snapshots.iterdir()) == expected
    for step in expected:
        names = {p.name for p in (snapshots / f"step-{step}").iterdir()}
        assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    last = load_file(snapshots / f"step-{steps}/model.safetensors")
    assert all(torch.equal(last[k], policy[k]) for k in policy)
    assert not list(dpo_workspace.glob("models/*.partial"))  # staging folders renamed into place
    # plots/ppo.csv: one row per step with the DPO statistics; held-out ones at the snapshot steps
    with (dpo_workspace / "plots/ppo.csv").open() as handle:
        history = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in history] == list(range(1, steps + 1))
    assert set(DPO_STATS) | {"lr", "eval/accuracy", "eval/rewards/margin"} <= set(history[0])
    assert [int(row["step"]) for row in history if row["eval/accuracy"]] == expected
    # metrics/ppo.json
    metrics = read_json(dpo_workspace / "metrics/ppo.json")
    assert metrics["algorithm"] == "dpo" and metrics["steps"] == steps and metrics["world_size"] == 1
    assert metrics["peak_rss_mib"] > 0 and metrics["seconds"] > 0
    assert metrics["final/dpo/loss"] == pytest.approx(float(history[-1]["dpo/loss"]))


def test_dpo_policy_prefers_the_chosen_responses_of_its_training_pairs(dpo_workspace: Path) -> None:
    # implicit reward margin h = log π/π_SFT(chosen) − log π/π_SFT(rejected), recomputed from the saved models: the
    # SFT model has h = 0 on every pair (accuracy 0, margin 0); the DPO policy ranks ≥ 65 % of the pairs right
    tokenizer = load_tokenizer(dpo_workspace / "models/sft")
    examples = dpo_examples(tokenizer, data.read_jsonl(dpo_workspace / "data/preferences/train.jsonl"))
    with torch.no_grad():
        logprobs = {
            name: pair_logprobs(
                TrainedForward(load_policy(dpo_workspace / f"models/{name}"), causal_lm_logits),
                examples,
                tokenizer.pad_token_id,
            )
            for name in ("sft", "policy")
        }
    (policy_chosen, policy_rejected), (sft_chosen, sft_rejected) = logprobs["policy"], logprobs["sft"]
    margin = (policy_chosen - sft_chosen) - (policy_rejected - sft_rejected)
    assert float((margin > 0).float().mean()) >= 0.65 and float(margin.mean()) > 0
    # the logged implicit-reward margin grows from 0 at the first step (π = π_SFT)
    metrics = read_json(dpo_workspace / "metrics/ppo.json")
    with (dpo_workspace / "plots/ppo.csv").open() as handle:
        first = next(csv.DictReader(handle))
    assert abs(float(first["dpo/rewards/margin"])) < 1e-4 and float(first["dpo/loss"]) == pytest.approx(
        0.6931, abs=1e-3
    )
    assert metrics["tail_mean/dpo/rewards/margin"] > 0.2 and metrics["tail_mean/dpo/accuracy"] > 0.6


def test_evaluate_scores_the_dpo_policy_and_its_snapshots(dpo_workspace: Path) -> None:
    result = launch("evaluate", dpo_workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_json(dpo_workspace / "metrics/evaluate.json")
    for name in ("gold_win_rate", "gold_score_policy", "gold_score_sft", "valid_rate_policy", "distinct_policy"):
        assert name in metrics
    assert 0.0 <= metrics["gold_win_rate"] <= 1.0 and metrics["kl_to_ref"] > 0  # the policy moved off the SFT
    with (dpo_workspace / "plots/overoptimization.csv").open() as handle:
        curve = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in curve] == [0, *expected_snapshots(expected_steps(dpo_workspace))]
    assert (dpo_workspace / "plots/ppo_training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # from the DPO history


@pytest.mark.parametrize(
    ("dpo", "names"),
    [
        ({"loss": "hinge"}, ["dpo.loss", "sigmoid or ipo"]),
        ({"batch_size": 4096}, ["data/preferences/train.jsonl", "dpo.batch_size"]),
    ],
)
def test_bad_dpo_input_is_refused_in_one_line_before_any_model_loads(
    pipeline_workspace: Path, tmp_path: Path, dpo: dict, names: list[str]
) -> None:
    workspace = copy_workspace(pipeline_workspace, tmp_path / "workspace")
    before = path_digest(workspace / "models")
    as_dpo(workspace, **dpo)
    result = launch("ppo", workspace)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(name in errors[0] for name in names) and "Fix:" in errors[0]
    assert "start" not in {
        record["event"] for record in read_events("ppo", workspace)
    }  # refused before the model loaded
    assert path_digest(workspace / "models") == before and not (workspace / "metrics/ppo.json").exists()


@pytest.mark.slow
def test_two_processes_train_the_one_process_update(pipeline_workspace: Path, tmp_path: Path) -> None:
    # the RM loop's pattern (tests/tasks/test_launch.py): 1 % of the update's norm (measured: 1e-4 after 24 steps)
    workspace = copy_workspace(pipeline_workspace, tmp_path / "workspace")
    as_dpo(workspace, epochs=1)
    assert launch("ppo", workspace).returncode == 0
    one = load_file(workspace / "models/policy/model.safetensors")
    set_params(workspace, launch={"ppo": TWO_PROCESSES})
    result = launch("ppo", workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_json(workspace / "metrics/ppo.json")["world_size"] == 2
    two = load_file(workspace / "models/policy/model.safetensors")
    start = load_file(workspace / "models/sft/model.safetensors")
    difference = torch.cat([(one[k] - two[k]).flatten() for k in start]).norm()
    update = torch.cat([(one[k] - start[k]).flatten() for k in start]).norm()
    assert update > 0.1 and difference / update < 0.01
