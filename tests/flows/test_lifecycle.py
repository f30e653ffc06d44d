"""The lifecycle and retrain flows against a real Prefect API (prefect_test_harness: tests/conftest.py's
`prefect_api`), on the tiny pipeline."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect.artifacts import Artifact  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402
from support import make_tiny_repo, write_params  # noqa: E402

import flows.console  # noqa: E402
from flows.console import Console  # noqa: E402
from flows.lifecycle import lifecycle  # noqa: E402
from flows.retrain import gate, retrain  # noqa: E402
from pipeline.workspace import stage_names  # noqa: E402

pytestmark = pytest.mark.slow
STAGE_ORDER = ("prepare", "sft", "sample_pairs", "label", "reward", "ppo", "evaluate", "release")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_repo(tmp_path_factory.mktemp("flows") / "repo")


def task_runs_of(flow_run_id) -> list:
    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return asyncio.run(read())


@pytest.fixture(scope="module")
def console_log() -> io.StringIO:
    """What the flows print for a person during this module's runs (as in a CI log: no terminal)."""
    return io.StringIO()


@pytest.fixture(scope="module")
def first_run(prefect_api, repo: Path, console_log: io.StringIO):
    flows.console._console = Console(stream=console_log, tty=False)
    try:
        state = lifecycle(repo_dir=str(repo), return_state=True)
    finally:
        flows.console._console = None
    return state


def test_the_console_names_every_stage_with_its_time_and_key_results(first_run, console_log: io.StringIO) -> None:
    text = console_log.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith("rlhf-lifecycle: flow run") and "Prefect UI: http" in lines[0]
    for index, stage in enumerate(STAGE_ORDER, start=1):
        started = [line for line in lines if line.startswith(f"[{index}/8] {stage} ") and " started " in line]
        done = [line for line in lines if line.startswith(f"[{index}/8] {stage} ") and " done in " in line]
        assert len(started) == 1 and len(done) == 1, (stage, text)
    summaries = {line.split()[1]: line for line in lines if " done in " in line}
    assert "eval loss" in summaries["sft"] and "held-out accuracy" in summaries["reward"]
    assert "RM score" in summaries["ppo"] and "KL" in summaries["ppo"] and "→ models/policy" in summaries["ppo"]
    assert "gold win rate" in summaries["evaluate"]
    assert len(lines) <= 50 and not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text)
    for noise in (
        '{"stage"',
        "To track the changes with git",
        "were not passed to `accelerate launch`",
        "Loading weights",
    ):
        assert noise not in text


def test_lifecycle_runs_one_task_per_dvc_stage_in_order(first_run, repo: Path) -> None:
    assert first_run.is_completed()
    results = first_run.result()
    assert list(results) == stage_names(repo) and len(results) == 8  # every stage of dvc.yaml, in its order
    assert not any(r["skipped"] for r in results.values())
    runs = sorted(task_runs_of(first_run.state_details.flow_run_id), key=lambda r: r.expected_start_time)
    assert [r.name for r in runs] == stage_names(repo)
    assert all(r.state.is_completed() for r in runs)
    assert json.loads((repo / "metrics/evaluate.json").read_text())["n_prompts"] > 0


def test_lifecycle_publishes_progress_metrics_and_evaluation_artifacts(first_run, repo: Path) -> None:
    progress = Artifact.get("ppo-progress")
    assert progress is not None and progress.type == "progress" and float(progress.data) == 100.0
    assert "RM score" in progress.description and "KL" in progress.description
    metrics = Artifact.get("stage-metrics")  # the latest: the evaluate stage's, its summary first
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert metrics.type == "markdown" and metrics.data.startswith("# Stage `evaluate`")
    assert f"**gold win rate {evaluation['gold_win_rate']:.3g}" in metrics.data
    assert f"| gold_win_rate | {evaluation['gold_win_rate']:.3g} |" in metrics.data
    markdown = Artifact.get("evaluation")
    assert markdown.type == "markdown" and markdown.data.startswith("# PPO policy vs SFT")
    verdict_line = markdown.data.splitlines()[2]
    assert verdict_line.startswith("**") and "gold judge" in verdict_line
    assert markdown.data.index("## Gold judge") < markdown.data.index("## Cost") < markdown.data.index("| prompt |")


def test_unchanged_stages_show_as_cached(first_run, repo: Path) -> None:
    state = lifecycle(repo_dir=str(repo), return_state=True)
    assert state.is_completed() and all(r["skipped"] for r in state.result().values())
    runs = task_runs_of(state.state_details.flow_run_id)
    assert {r.state.name for r in runs} == {"Cached"} and len(runs) == 8


def test_a_failing_stage_fails_the_flow_and_stops_later_stages(first_run, repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["gold"] = "no_such_module:judge"
    write_params(repo, params)
    try:
        state = lifecycle(repo_dir=str(repo), return_state=True)
        assert state.is_failed()
        runs = {r.name: r for r in task_runs_of(state.state_details.flow_run_id)}
        assert runs["evaluate"].state.is_failed() and "release" not in runs
        assert "no_such_module" in runs["evaluate"].state.message or "no_such_module" in str(state.message)
        with pytest.raises(Exception, match="no_such_module"):
            state.result()
    finally:
        params["evaluate"]["gold"] = "rlhf.embedded:gold_score"
        write_params(repo, params)


def test_gate_promotes_only_when_better_by_the_margin() -> None:
    assert gate({"gold_win_rate": 0.8}, None, "gold_win_rate", 0.05)[0]
    promoted = {"metrics": {"gold_win_rate": 0.8}}
    assert gate({"gold_win_rate": 0.86}, promoted, "gold_win_rate", 0.05)[0]
    assert not gate({"gold_win_rate": 0.84}, promoted, "gold_win_rate", 0.05)[0]
    assert not gate({}, promoted, "gold_win_rate", 0.0)[0]


def test_retrain_skips_without_changes_and_records_the_decision(first_run, repo: Path) -> None:
    lifecycle(repo_dir=str(repo))  # back to an up-to-date pipeline after the failure test
    decision = retrain(repo_dir=str(repo))
    assert decision == {"ran": False, "promoted": False, "reason": "no input changed since the last run"}
    assert "no input changed" in Artifact.get("retrain-decision").data
    # a changed PPO param: the lifecycle reruns ppo/evaluate/release and the first model is promoted
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["ppo"]["learning_rate"] = 0.0002
    write_params(repo, params)
    decision = retrain(repo_dir=str(repo), margin=0.0)
    # DVC names the stages whose own inputs changed: ppo, and release (its model card lists all of params.yaml)
    assert decision["ran"] and decision["changed_stages"] == ["ppo", "release"]
    assert decision["promoted"] and (repo / ".rlhf/promoted/release/model.safetensors").exists()
    # an impossible margin: the gate refuses and the promoted model stays
    params["ppo"]["learning_rate"] = 0.0003
    write_params(repo, params)
    before = (repo / ".rlhf/promoted/record.json").read_text()
    decision = retrain(repo_dir=str(repo), margin=10.0)
    assert decision["ran"] and not decision["promoted"]
    assert (repo / ".rlhf/promoted/record.json").read_text() == before
