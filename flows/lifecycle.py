"""Flow `rlhf-lifecycle`: every DVC stage as a Prefect task, in dvc.yaml order.

    rlhf run        # against PREFECT_API_URL when set, else an ephemeral local Prefect server

A failing stage fails its task and the flow; later stages do not run. A second run started on the same workspace
while one is in progress fails at once (or waits, `wait_for_lock_s`): see pipeline/lock.py. The ppo task is retried once
when its process crashes (killed, preempted, out of memory): the retry resumes from the last resume checkpoint
(`ppo.resume_every`), not from iteration 0; a stage that stopped on bad input or divergence is not retried. If the
Prefect API goes away, the running stage runs on (DVC records it) and the flow stops after it, unless the API answers
again by then (flows/stages.py, PrefectApiLost).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.utilities.urls import url_for

from flows.console import console
from flows.labeling import collect_human_labels
from flows.notify import notify_failure
from flows.stages import StageOutcome, run_stage
from pipeline.lock import workspace_lock
from pipeline.workspace import stage_names
from rlhf.params import load_params

# Retries per stage. ppo resumes from its resume checkpoint, so a retry costs at most ppo.resume_every iterations;
# sft and reward resume too but are short; the others restart, and a human-labelled run must not repeat silently.
STAGE_RETRIES = {"ppo": 1}


def run_page() -> str:
    """This flow run's page in the Prefect UI (the "View at" link Prefect logs); with no UI address configured, the
    page on the server the run reports to (`rlhf run`'s temporary server: it stops when the run ends)."""
    url = url_for("flow-run", obj_id=flow_run.id)
    if url:
        return url
    context = FlowRunContext.get()
    api = str(context.client.api_url).rstrip("/") if context else ""
    if not api:
        return "the Prefect UI"
    return f"{api.removesuffix('/api')}/runs/flow-run/{flow_run.id} (a temporary server: it stops with this run)"


def stage_task(stage: str, retries: dict[str, int], stage_timeout_s: float | None):
    """The run_stage task with this stage's retries and the flow's timeout."""
    options: dict = {"retries": retries.get(stage, 0)}
    if stage_timeout_s:
        options["timeout_seconds"] = stage_timeout_s
    return run_stage.with_options(**options)


@flow(name="rlhf-lifecycle", log_prints=True, on_failure=[notify_failure], on_crashed=[notify_failure])
def lifecycle(
    repo_dir: str = ".",
    stage_timeout_s: float | None = None,
    label_batch_size: int = 8,
    label_batches: int = 1,
    label_timeout_s: int = 3600,
    wait_for_lock_s: float = 0.0,
    stage_retries: dict[str, int] | None = None,
) -> dict[str, dict]:
    """Run the pipeline; returns each stage's metrics (and whether DVC skipped it).

    With `label.annotator: human` the flow pauses before the label stage for people to label pairs in the UI.
    One run per workspace (pipeline/lock.py): if another run holds the lock, the flow fails at once naming the holder,
    or after waiting ``wait_for_lock_s`` seconds for it. ``stage_retries``: retries per stage name (default
    :data:`STAGE_RETRIES`, ppo 1; unnamed stages 0).
    """
    logger = get_run_logger()
    repo = str(Path(repo_dir).resolve())
    retries = STAGE_RETRIES if stage_retries is None else stage_retries
    with workspace_lock(repo, wait_for_lock_s, "rlhf-lifecycle flow") as lock:
        logger.info("holding the workspace lock %s", lock)
        console().line(
            f"rlhf-lifecycle: flow run '{flow_run.name}' on {repo} ({len(stage_names(repo))} stages; DVC reruns what "
            f"changed) · Prefect UI: {run_page()}"
        )
        return run_stages(repo, stage_timeout_s, label_batch_size, label_batches, label_timeout_s, retries)


def run_stages(
    repo: str,
    stage_timeout_s: float | None,
    label_batch_size: int,
    label_batches: int,
    label_timeout_s: int,
    retries: dict[str, int] | None = None,
) -> dict[str, dict]:
    """Every stage as a task, in order (the caller holds the workspace lock)."""
    logger = get_run_logger()
    results: dict[str, dict] = {}
    for stage in stage_names(repo):
        if stage == "label" and load_params(Path(repo, "params.yaml")).label.annotator == "human":
            console().line(
                f"label: waiting for human labels: open {run_page()} (the paused subflow run), press Resume and "
                "answer the form"
            )
            labelling = collect_human_labels(
                repo, batch_size=label_batch_size, n_batches=label_batches, timeout_s=label_timeout_s
            )
            new, skipped, where = (labelling[k] for k in ("labelled", "skipped", "labels_file"))
            done = f"human labels: {new} new, {skipped} skipped ({where})"
            logger.info(done)
            console().line(f"label: {done}")
        state = stage_task(stage, STAGE_RETRIES if retries is None else retries, stage_timeout_s)(
            stage, repo, return_state=True
        )
        outcome: StageOutcome = state.result()  # raises the stage's error, failing the flow
        results[stage] = {"skipped": outcome.skipped, "metrics": outcome.metrics}
        logger.info("stage %s: %s", stage, "unchanged (cached)" if outcome.skipped else "ran")
    return results
