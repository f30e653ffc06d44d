"""End to end: `dvc repro` of the tiny pipeline in a fresh git repository, then a no-op, then `dvc exp run -S`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support import git_env, make_tiny_repo

pytestmark = pytest.mark.slow
STAGES = ["prepare", "sft", "sample_pairs", "label", "reward", "ppo", "evaluate", "release"]


def run(repo: Path, *args: str) -> str:
    result = subprocess.run(args, cwd=repo, env=git_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_repo(tmp_path_factory.mktemp("e2e") / "repo")


def test_dvc_repro_runs_every_stage_then_is_a_no_op(repo: Path) -> None:
    output = run(repo, sys.executable, "-m", "dvc", "repro")
    assert stages_run(output) == STAGES
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert evaluation["n_prompts"] > 0 and 0 <= evaluation["gold_win_rate"] <= 1
    card = (repo / "models/release/README.md").read_text()
    assert lock["stages"]["ppo"]["outs"][0]["md5"] in card  # lineage: the card names the DVC hash of the policy
    for stage in ("prepare", "ppo", "evaluate"):  # … and of every dep and out of the upstream stages
        assert all(item["md5"] in card for kind in ("deps", "outs") for item in lock["stages"][stage].get(kind, []))
    assert {"models/policy_checkpoints", "plots/ppo.csv"} <= {dep["path"] for dep in lock["stages"]["evaluate"]["deps"]}
    again = run(repo, sys.executable, "-m", "dvc", "repro")
    assert stages_run(again) == [] and "up to date" in again
    shown = run(repo, sys.executable, "-m", "dvc", "metrics", "show", "--json")
    assert "gold_win_rate" in shown and "accuracy" in shown


def test_changing_a_ppo_param_reruns_only_ppo_evaluate_release(repo: Path) -> None:
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "pipeline outputs")
    output = run(repo, sys.executable, "-m", "dvc", "exp", "run", "-S", "ppo.learning_rate=0.0002")
    assert stages_run(output) == ["ppo", "evaluate", "release"]
    assert yaml.safe_load((repo / "params.yaml").read_text())["ppo"]["learning_rate"] == 0.0002
    shown = run(repo, sys.executable, "-m", "dvc", "exp", "show", "--json")
    assert "0.0002" in shown
