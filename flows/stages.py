"""The Prefect task that runs one DVC stage: DVC decides (and caches), Prefect shows.

The stage runs as ``dvc repro --single-item STAGE`` in a subprocess (the flow never holds a model). Three channels:
- its whole output (DVC, accelerate, the program's plain lines) goes to ``.rlhf/logs/STAGE.log`` and, line by line,
  to the task's log in the Prefect UI;
- its events (tasks/stage_io.py: JSON lines in ``.rlhf/logs/STAGE.jsonl``) are tailed while it runs: progress becomes
  a live progress artifact (PPO: key ``ppo-progress``) and the console's progress bar (flows/console.py);
- when it ends, its metrics become a markdown artifact (key ``stage-metrics``: the summary first, then one table per
  metrics file) and the evaluation one led by the verdict (key ``evaluation``: flows/artifacts.py), and the console
  prints one summary line. A stage DVC skips as unchanged finishes in a COMPLETED state named ``Cached``.

Retries (given per stage by the lifecycle flow: ppo 1) rerun the stage, which resumes from its last resume
checkpoint; a stage that stopped on purpose (bad input: exit 2, diverged: exit 3, reported in a ``failed`` event
since the launchers do not pass exit codes on) is not retried, nor a timed-out one.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.states import Completed

from flows.artifacts import evaluation_markdown, stage_markdown, stage_summary
from flows.console import console
from pipeline.workspace import dvc_command, stage_environment, stage_metrics_files, stage_names, stage_outputs
from tasks.stage_io import EXIT_BAD_INPUT, EXIT_DIVERGED, EventTail, events_file, key_numbers

SKIPPED_MARKERS = ("didn't change, skipping", "is cached - skipping run")
METRICS_ARTIFACT_KEY, PROGRESS_ARTIFACT_KEY, EVALUATION_ARTIFACT_KEY = "stage-metrics", "ppo-progress", "evaluation"
POLL_EVENTS_S = 0.2
DVC_FAILED = 255  # `dvc repro`'s own status when a stage's command fails; its ERROR line has the command's status
DVC_EXITED = re.compile(r"^ERROR: failed to reproduce .*exited with (-?\d+)\s*$")


NO_RETRY_EXIT_CODES = frozenset({EXIT_BAD_INPUT, EXIT_DIVERGED})  # a rerun would fail the same way


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message carries the end of its output.

    ``exit_code``: the stage program's own status when it reported one (``failed`` event), else DVC's.
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
    """Turns a stage's progress events into one progress artifact, created on the first, updated after."""

    def __init__(self, stage: str):
        self.stage = stage
        self.artifact_id = None

    def __call__(self, record: dict) -> None:
        if record.get("event") != "progress" or not record.get("total"):
            return
        percent = 100.0 * float(record["step"]) / float(record["total"])
        numbers = key_numbers(record)
        shown = f"{self.stage}: step {record['step']}/{record['total']}" + (f" · {numbers}" if numbers else "")
        if self.artifact_id is None:
            key = PROGRESS_ARTIFACT_KEY if self.stage == "ppo" else f"{self.stage.replace('_', '-')}-progress"
            self.artifact_id = create_progress_artifact(progress=percent, key=key, description=shown)
        else:
            update_progress_artifact(self.artifact_id, progress=percent, description=shown)


def publish_stage_artifacts(repo_dir: str | Path, stage: str, by_file: dict[str, dict[str, object]]) -> None:
    """The stage's metrics (summary first, a table per file) and, for evaluate, the evaluation led by its verdict."""
    if by_file:
        create_markdown_artifact(
            markdown=stage_markdown(stage, by_file), key=METRICS_ARTIFACT_KEY, description=f"metrics of stage {stage}"
        )
    if stage == "evaluate":
        evaluation = by_file.get("metrics/evaluate.json", {})
        ppo_path, samples = Path(repo_dir, "metrics/ppo.json"), Path(repo_dir, "metrics/samples.md")
        ppo = flatten(json.loads(ppo_path.read_text())) if ppo_path.exists() else {}
        create_markdown_artifact(
            markdown=evaluation_markdown(evaluation, ppo, samples.read_text() if samples.exists() else ""),
            key=EVALUATION_ARTIFACT_KEY,
            description="PPO policy vs SFT: the verdict, gold vs proxy, cost, health, samples",
        )


def run_dvc_stage(repo_dir: str | Path, stage: str, on_line, on_record) -> tuple[int, bool, str]:
    """Run ``dvc repro --single-item STAGE``: its output to ``.rlhf/logs/STAGE.log`` and ``on_line``, its events to
    ``on_record`` while it runs; returns (exit code, skipped, output tail)."""
    command = dvc_command("repro", "--single-item", stage)
    events = events_file(stage, repo_dir)
    events.parent.mkdir(parents=True, exist_ok=True)
    events.unlink(missing_ok=True)  # the file will hold this run's events only
    tail: deque[str] = deque(maxlen=40)
    skipped = threading.Event()

    def pump(stream, log) -> None:  # the output, read on its own thread so events are shown while the stage is silent
        for raw in stream:
            line = raw.rstrip()
            log.write(raw)
            log.flush()
            tail.append(line)
            if any(marker in line for marker in SKIPPED_MARKERS):
                skipped.set()
            on_line(line)

    reader = EventTail(events)
    with (
        open(log_file(repo_dir, stage), "w") as log,
        subprocess.Popen(
            command,
            cwd=repo_dir,
            env=stage_environment(unbuffered=True),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        ) as process,
    ):
        assert process.stdout is not None
        pumping = threading.Thread(target=pump, args=(process.stdout, log), daemon=True)
        pumping.start()
        while process.poll() is None:
            for record in reader.read():
                on_record(record)
            time.sleep(POLL_EVENTS_S)
        pumping.join()
        for record in reader.read():
            on_record(record)
    return process.returncode, skipped.is_set(), "\n".join(tail)


def log_file(repo_dir: str | Path, stage: str) -> Path:
    """Where a stage's whole output goes (beside its events file)."""
    return events_file(stage, repo_dir).with_suffix(".log")


def stage_exit_code(exit_code: int, tail: str) -> int:
    """The stage program's own exit code: ``exit_code`` unless that is DVC's generic 255, then the status DVC's
    ``ERROR: failed to reproduce …, exited with N`` line gives."""
    if exit_code == DVC_FAILED:
        for line in reversed(tail.splitlines()):
            match = DVC_EXITED.match(line.strip())
            if match:
                return int(match.group(1))
    return exit_code


def failure_reason(tail: str) -> list[str]:
    """The lines that say why a stage failed: its ``error:`` lines (the one-line refusals) and DVC's ``ERROR``, else
    the last lines of its output."""
    lines = [line for line in tail.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "ERROR:", "ERROR "))]
    return (errors or lines[-8:])[-4:]


def read_stage_metrics(repo_dir: str | Path, stage: str) -> dict[str, dict[str, object]]:
    """The stage's metrics files (dvc.yaml's ``metrics``), flattened, by path."""
    by_file = {}
    for path in stage_metrics_files(repo_dir, stage):
        if path.exists():
            by_file[str(path.relative_to(repo_dir))] = flatten(json.loads(path.read_text()))
    return by_file


@task(task_run_name="{stage}", retries=0, retry_condition_fn=retry_on_crash, log_prints=False)
def run_stage(stage: str, repo_dir: str = ".") -> StageOutcome:
    """One DVC stage as a Prefect task. No retries by default (DVC makes a rerun by hand cheap); the lifecycle flow
    gives ppo one (``with_options(retries=…)``), which resumes from its last resume checkpoint."""
    logger, screen = get_run_logger(), console()
    names = stage_names(repo_dir)
    reporter, stops = ProgressReporter(stage), []
    log_path = log_file(repo_dir, stage)
    shown_path = log_path.relative_to(repo_dir)
    screen.stage_started(stage, names.index(stage) + 1 if stage in names else 0, len(names), str(shown_path))

    def on_record(record: dict) -> None:
        if record.get("event") == "failed" and isinstance(record.get("exit_code"), int):
            stops.append(record["exit_code"])
        reporter(record)
        screen.event(record)

    def on_line(line: str) -> None:  # the task's log in the Prefect UI (on the console only with --verbose: cli.py)
        logger.log(logging.INFO, line)

    code, skipped, tail = run_dvc_stage(repo_dir, stage, on_line, on_record)
    if code != 0:
        code = stops[-1] if stops else stage_exit_code(code, tail)  # the launchers do not pass every code on
        screen.stage_failed(code, failure_reason(tail), str(shown_path))
        raise StageFailed(stage, code, tail)
    by_file = read_stage_metrics(repo_dir, stage)
    metrics = {name: value for values in by_file.values() for name, value in values.items()}
    screen.stage_finished(stage_summary(stage, metrics), stage_outputs(repo_dir, stage), skipped)
    publish_stage_artifacts(repo_dir, stage, by_file)
    outcome = StageOutcome(stage, skipped, metrics)
    if skipped:
        logger.info("stage %s unchanged: DVC skipped it (outputs restored from the cache)", stage)
        return Completed(message=f"DVC: stage {stage} unchanged, skipped", name="Cached", data=outcome)
    return outcome
