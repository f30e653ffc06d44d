"""The `ppo` stage under each critic-free algorithm and with a rule as the reward (docs/design.md §4b), run as dvc.yaml
runs it (in-process, on a copy of the tiny pipeline's workspace)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import run_stage, set_params


def nan_reward(prompt: str, response: str) -> float:
    """A broken rule: the stage must stop on it, not train on NaN."""
    return math.nan


def history(workspace: Path) -> list[dict]:
    with (workspace / "plots/ppo.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(
    "ppo",
    [
        {"algorithm": "grpo", "group_size": 4, "kl_penalty": "loss"},
        {"algorithm": "rloo", "group_size": 2, "filter_uniform_groups": True},
        {"algorithm": "reinforce_pp"},
    ],
    ids=lambda ppo: ppo["algorithm"],
)
def test_a_critic_free_algorithm_trains_the_policy_and_no_value_model(in_copy_of_workspace: Path, ppo: dict) -> None:
    set_params(in_copy_of_workspace, ppo=ppo)
    run_stage("ppo")
    metrics = json.loads((in_copy_of_workspace / "metrics/ppo.json").read_text())
    assert metrics["algorithm"] == ppo["algorithm"]
    assert metrics["trainable_parameters"] == metrics["policy_parameters"]  # no critic, no value head
    rows = history(in_copy_of_workspace)
    assert len(rows) == 2 and "ppo/loss/value" not in rows[0] and "ppo/loss/policy" in rows[0]
    if ppo["algorithm"] == "grpo":
        assert float(rows[0]["ppo/loss/kl"]) >= 0  # the KL is a loss term: k3 ≥ 0
    if ppo.get("group_size", 1) > 1:
        assert 0 < float(rows[0]["rollout/group_distinct"]) <= 1
    if ppo.get("filter_uniform_groups"):
        assert 0 <= float(rows[0]["rollout/filtered_groups"]) <= 1
    policy = load_file(in_copy_of_workspace / "models/policy/model.safetensors")
    sft = load_file(in_copy_of_workspace / "models/sft/model.safetensors")
    assert any(not torch.equal(policy[name], sft[name]) for name in policy)


def constant_reward(prompt: str, response: str) -> float:
    """A rule whose scores are known: 2.5 for every response (that ends; the EOS trick's −3 otherwise)."""
    return 2.5


def test_a_rule_reward_replaces_the_reward_model(in_copy_of_workspace: Path) -> None:
    rule = f"{__name__}:constant_reward"
    set_params(in_copy_of_workspace, ppo={"algorithm": "rloo", "group_size": 2, "reward": rule})
    run_stage("ppo")
    assert json.loads((in_copy_of_workspace / "metrics/ppo.json").read_text())["reward"] == rule
    for row in history(in_copy_of_workspace):  # 16 episodes: the mean score is the rule's, EOS trick included
        ended = float(row["val/num_eos_tokens"])
        assert float(row["objective/scores"]) == pytest.approx((2.5 * ended - 3.0 * (16 - ended)) / 16)


def test_a_rule_that_returns_nan_stops_the_stage_naming_the_rule(in_copy_of_workspace: Path, capsys) -> None:
    before = (in_copy_of_workspace / "models/policy/model.safetensors").read_bytes()
    set_params(in_copy_of_workspace, ppo={"reward": f"{__name__}:nan_reward"})
    with pytest.raises(SystemExit) as stop:
        run_stage("ppo")
    assert stop.value.code == 3
    error = capsys.readouterr().err
    assert f"the rule ppo.reward = '{__name__}:nan_reward' returned NaN/inf" in error
    assert (in_copy_of_workspace / "models/policy/model.safetensors").read_bytes() == before  # nothing damaged
