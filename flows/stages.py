"""The Prefect task that runs one DVC stage: DVC decides (and caches), Prefect shows.

The stage runs as ``dvc repro --single-item STAGE`` in a subprocess (the flow never holds a model). Its output
streams into the task's log line by line; ``@rlhf`` progress lines (tasks/stage_io.py) become a live progress
artifact (PPO: key ``ppo-progress``); afterwards the stage's metrics become a table artifact (key
``stage-metrics``) and the evaluation a markdown artifact (key ``evaluation``). A stage DVC skips as unchanged
finishes in a COMPLETED state named ``Cached``.

Retries (given per stage by the lifecycle flow: ppo 1) rerun the stage, which resumes from its last resume
checkpoint; a stage that stopped on purpose (bad input: exit 2, diverged: exit 3, reported in an ``@rlhf failed``
event since the launchers do not pass exit codes on) is not retried, nor a timed-out one.
"""

from __future__ import annotations

import json
import subprocess
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.states import Completed

from pipeline.workspace import dvc_command, stage_environment, stage_metrics_files
from tasks.stage_io import EXIT_BAD_INPUT, EXIT_DIVERGED, PROGRESS_PREFIX

SKIPPED_MARKERS = ("didn't change, skipping", "is cached - skipping run")
METRICS_ARTIFACT_KEY, PROGRESS_ARTIFACT_KEY, EVALUATION_ARTIFACT_KEY = "stage-metrics", "ppo-progress", "evaluation"
PPO_PROGRESS_FIELDS = ("step", "total", "objective/scores", "objective/kl", "objective/kl_coef", "eps")


NO_RETRY_EXIT_CODES = frozenset({EXIT_BAD_INPUT, EXIT_DIVERGED})  # a rerun would fail the same way


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message carries the end of its output.

    ``exit_code``: the stage program's own status when it reported one (``@rlhf failed`` event), else DVC's.
    """

    def __init__(self, stage: str, exit_code: int, tail: str) -> None:
        super().__init__(f"stage {stage!r} failed (exit {exit_code}):\n{tail}")
        self.stage, self.exit_code, self.tail = stage, exit_code, tail

    def __reduce__(self):  # picklable with its fields (Prefect may persist the exception as the failed state's result)
        return (type(self), (self.stage, self.exit_code, self.tail))


def retry_on_crash(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry a stage that crashed (killed, out of memory, …), not one that stopped on
    purpose (:data:`NO_RETRY_EXIT_CODES`) nor one that timed out (its process may still be running)."""
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(error, StageFailed) and error.exit_code not in NO_RETRY_EXIT_CODES


def flatten(record: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


@dataclass
class StageOutcome:
    stage: str
    skipped: bool  # DVC found the stage unchanged and did not run it
    metrics: dict[str, object]


class ProgressReporter:
    """Turns a stage's progress lines into one progress artifact, created on the first line, updated after."""

    def __init__(self, stage: str):
        self.stage = stage
        self.artifact_id = None

    def __call__(self, record: dict) -> None:
        if record.get("event") != "progress" or not record.get("total"):
            return
        percent = 100.0 * float(record["step"]) / float(record["total"])
        shown = ", ".join(
            f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}"
            for k in PPO_PROGRESS_FIELDS
            if k in record
        )
        if self.artifact_id is None:
            key = PROGRESS_ARTIFACT_KEY if self.stage == "ppo" else f"{self.stage.replace('_', '-')}-progress"
            self.artifact_id = create_progress_artifact(progress=percent, key=key, description=f"{self.stage}: {shown}")
        else:
            update_progress_artifact(self.artifact_id, progress=percent, description=f"{self.stage}: {shown}")


def publish_stage_artifacts(repo_dir: str | Path, stage: str, metrics: dict[str, object]) -> None:
    if metrics:
        rows = [{"stage": stage, "metric": name, "value": value} for name, value in metrics.items()]
        create_table_artifact(table=rows, key=METRICS_ARTIFACT_KEY, description=f"metrics of stage {stage}")
    if stage == "evaluate":
        samples = Path(repo_dir, "metrics/samples.md")
        lines = ["# Evaluation: PPO policy vs SFT", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        text = "\n".join(lines) + "\n\n" + (samples.read_text() if samples.exists() else "")
        create_markdown_artifact(
            markdown=text, key=EVALUATION_ARTIFACT_KEY, description="evaluation metrics and samples"
        )


def run_dvc_stage(repo_dir: str | Path, stage: str, on_line, on_record) -> tuple[int, bool, str]:
    """Run ``dvc repro --single-item STAGE``, streaming lines; returns (exit code, skipped, output tail)."""
    command = dvc_command("repro", "--single-item", stage)
    tail: deque[str] = deque(maxlen=40)
    skipped = False
    with subprocess.Popen(
        command,
        cwd=repo_dir,
        env=stage_environment(unbuffered=True),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as process:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip()
            tail.append(line)
            skipped = skipped or any(marker in line for marker in SKIPPED_MARKERS)
            if line.startswith(PROGRESS_PREFIX):
                try:
                    on_record(json.loads(line[len(PROGRESS_PREFIX) :]))
                except json.JSONDecodeError:
                    pass
            on_line(line)
        code = process.wait()
    return code, skipped, "\n".join(tail)


@task(task_run_name="{stage}", retries=0, retry_condition_fn=retry_on_crash, log_prints=False)
def run_stage(stage: str, repo_dir: str = ".") -> StageOutcome:
    """One DVC stage as a Prefect task. No retries by default (DVC makes a rerun by hand cheap); the lifecycle flow
    gives ppo one (``with_options(retries=…)``), which resumes from its last resume checkpoint."""
    logger = get_run_logger()
    reporter, stops = ProgressReporter(stage), []

    def on_record(record: dict) -> None:
        if record.get("event") == "failed" and isinstance(record.get("exit_code"), int):
            stops.append(record["exit_code"])
        reporter(record)

    code, skipped, tail = run_dvc_stage(repo_dir, stage, logger.info, on_record)
    if code != 0:
        raise StageFailed(stage, stops[-1] if stops else code, tail)
    metrics: dict[str, object] = {}
    for path in stage_metrics_files(repo_dir, stage):
        if path.exists():
            metrics.update(flatten(json.loads(path.read_text())))
    publish_stage_artifacts(repo_dir, stage, metrics)
    outcome = StageOutcome(stage, skipped, metrics)
    if skipped:
        logger.info("stage %s unchanged: DVC skipped it (outputs restored from the cache)", stage)
        return Completed(message=f"DVC: stage {stage} unchanged, skipped", name="Cached", data=outcome)
    return outcome
