"""The one stage list (dvc.yaml, in its order), the stage environment and the dvc runner."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from support import REPO

from pipeline.workspace import (
    dvc_command,
    stage_environment,
    stage_metrics_files,
    stage_names,
    stage_outputs,
    upstream_of,
)

STAGES = ["prepare", "sft", "sample_pairs", "label", "reward", "ppo", "evaluate", "release"]


def test_stage_list_is_dvc_yaml_in_its_order(tmp_path: Path) -> None:
    assert stage_names(REPO) == STAGES
    assert upstream_of("release", REPO) == STAGES[:-1] and upstream_of("prepare", REPO) == []
    assert stage_names(tmp_path) == [] and upstream_of("release", tmp_path) == []  # no dvc.yaml: no stages


def test_metrics_files_come_from_dvc_yaml() -> None:
    assert stage_metrics_files(REPO, "ppo") == [REPO / "metrics/ppo.json", REPO / "dvclive/ppo/metrics.json"]
    assert stage_metrics_files(REPO, "release") == []


def test_stage_outputs_come_from_dvc_yaml() -> None:
    assert stage_outputs(REPO, "ppo") == ["models/policy", "models/policy_checkpoints", "plots/ppo.csv"]
    assert stage_outputs(REPO, "release") == ["models/release"]


def test_stage_commands_run_on_this_interpreter(monkeypatch) -> None:
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    env = stage_environment()
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent) and "PYTHONUNBUFFERED" not in env
    assert stage_environment(unbuffered=True)["PYTHONUNBUFFERED"] == "1"
    assert dvc_command("status") == [sys.executable, "-m", "dvc", "status"]
